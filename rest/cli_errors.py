"""One-line errors for every command line of the project (``rest``, ``retriever-server``,
``decoder-server``).

An ordinary error (a missing path, a bad option value, a corrupt datastore, an unreachable
retriever, a port in use, a bad TLS file) is one line on stderr that says what was wrong and what
to do, with exit status 1; a usage error (unknown option, missing argument) exits 2 with click's
usage text. Tracebacks are for developers: ``--debug`` anywhere before ``--`` on the command line,
or ``REST_DEBUG=1`` in the environment, shows them.

Code that knows what went wrong raises ``click.ClickException`` (or ``click.UsageError``) with a
message written for the user; anything else that escapes a command still ends as one line, named
by its exception type, so that a forgotten case is never a 40-line traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

import click

DEBUG_FLAG = "--debug"
DEBUG_ENV = "REST_DEBUG"


def debug_requested(argv: Sequence[str], environ=os.environ) -> bool:
    """``--debug`` among the options (before a ``--``), or ``REST_DEBUG`` set to a true value."""
    options = argv[: list(argv).index("--")] if "--" in argv else argv
    value = environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in options or value in ("1", "true", "yes", "on")


def without_debug_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without the ``--debug`` switches that ``run`` consumes (those before ``--``)."""
    if "--" in argv:
        cut = list(argv).index("--")
        return [a for a in argv[:cut] if a != DEBUG_FLAG] + list(argv[cut:])
    return [a for a in argv if a != DEBUG_FLAG]


def one_line(exc: BaseException) -> str:
    """The exception's message on one line; its type when the message alone would say nothing."""
    message = " ".join(str(exc).split())
    if isinstance(exc, click.ClickException):
        return " ".join(exc.format_message().split())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        message = str(exc.args[0])  # str(KeyError) adds quotes around the message
    if not message:
        return type(exc).__name__
    if isinstance(exc, (OSError, ValueError, RuntimeError)) and type(exc).__module__ == "builtins":
        return message
    return f"{type(exc).__name__}: {message}"


def run(command: click.Command, prog_name: str, argv: Sequence[str] | None = None) -> None:
    """Run ``command`` as a console script: exits 0 on success, 1 with one line for an error,
    2 for a usage error, 130 on Ctrl-C. Never returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        # Not standalone: click then returns the code of ``ctx.exit`` (``--help``) or the
        # command's return value, and raises every error for the handlers below.
        status = command.main(args=without_debug_flag(argv), prog_name=prog_name,
                              standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        print(f"{prog_name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog_name}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if debug:
            traceback.print_exc()
        hint = "" if debug else f" (run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)"
        print(f"{prog_name}: error: {one_line(exc)}{hint}", file=sys.stderr)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
