"""``python -m decoder.server``: the ``decoder-server`` command."""

from decoder.server.cli import main

if __name__ == "__main__":
    main()
