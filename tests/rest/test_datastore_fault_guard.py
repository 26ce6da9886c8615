"""The SIGBUS guard catches faults inside shard mappings only: a fault anywhere else still ends
the process as it would without the guard (through Python's faulthandler when it is on)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FOREIGN_FAULT = textwrap.dedent("""
    import mmap, os, sys
    from rest.datastore import Datastore, build_datastore
    build_datastore(sys.argv[1] + "/ds", [[1, 2, 3]] * 3, vocab_size=8, tokenizer_name="t",
                    tokenizer_fingerprint="f")
    ds = Datastore.open(sys.argv[1] + "/ds")  # installs the guard
    path = sys.argv[1] + "/other"
    with open(path, "wb") as f:
        f.write(b"x" * 65536)
    f = open(path, "r+b")
    view = mmap.mmap(f.fileno(), 65536, access=mmap.ACCESS_READ)
    os.truncate(path, 0)
    print("reading", flush=True)
    view[40000]  # SIGBUS, not in a shard mapping
    print("survived", flush=True)
""")


@pytest.mark.parametrize("faulthandler", [False, True])
def test_a_fault_outside_the_datastore_still_ends_the_process(tmp_path, faulthandler):
    flags = ["-X", "faulthandler"] if faulthandler else []
    done = subprocess.run([sys.executable, *flags, "-c", FOREIGN_FAULT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert "reading" in done.stdout and "survived" not in done.stdout
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stderr)
    if faulthandler:
        assert "Bus error" in done.stderr  # the previous handler ran
