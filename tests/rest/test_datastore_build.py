"""Building over an existing datastore: the swap is atomic under SIGKILL, and the temporary
directories of killed builds are removed by the next build."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rest.datastore import Datastore, DatastoreError, build_datastore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(path, n_docs: int, **kw):
    docs = [[(i * 7 + d) % 9 for i in range(50)] for d in range(n_docs)]
    return build_datastore(path, docs, vocab_size=10, tokenizer_name="t", tokenizer_fingerprint="f",
                           **kw)


def temporaries(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".tmp-"))


def test_overwrite_never_replaces_a_directory_that_is_not_a_datastore(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a datastore .* refusing to replace it"):
        build(out, 3, overwrite=True)
    assert (out / "notes.txt").read_text() == "precious"
    (out / "notes.txt").unlink()
    build(out, 3, overwrite=True)  # an empty directory may be replaced
    assert Datastore.open(out).info().n_docs == 3


def test_a_later_build_removes_the_temporaries_of_dead_builds_only(tmp_path):
    out = tmp_path / "ds"
    # A build killed before it made its lock file: its process id names no process (it is above
    # the kernel's largest pid).
    dead_unlocked = tmp_path / f"ds.tmp-{2**22 + 12345}"
    dead_unlocked.mkdir()
    (dead_unlocked / "shard-00000.rds").write_bytes(b"x" * 100)
    # A build killed after locking: its lock file is there, and nobody holds it.
    dead_locked = tmp_path / "ds.tmp-1"
    dead_locked.mkdir()
    (dead_locked / ".lock").touch()
    # A build still running: another process holds its lock (flock(1) as a stand-in builder).
    alive = tmp_path / "ds.tmp-2"
    alive.mkdir()
    (alive / ".lock").touch()
    holder = subprocess.Popen(["flock", "--close", str(alive / ".lock"), "sleep", "30"])
    try:
        time.sleep(0.3)  # flock has taken the lock
        build(out, 2)
        assert temporaries(out) == ["ds.tmp-2"]
        assert Datastore.open(out).info().n_docs == 2
    finally:
        holder.kill()
        holder.wait()
    build(out, 3, overwrite=True)  # the holder is gone now: its directory goes too
    assert temporaries(out) == []


BUILDER = textwrap.dedent("""
    import sys
    from rest.datastore import build_datastore
    out, n_docs = sys.argv[1], int(sys.argv[2])
    docs = [[(i * 7 + d) % 9 for i in range(400)] for d in range(n_docs)]
    build_datastore(out, docs, vocab_size=10, tokenizer_name="t", tokenizer_fingerprint="f",
                    shard_tokens=4000, overwrite=True)
""")


def test_out_is_always_a_whole_datastore_while_builds_are_killed(tmp_path):
    """A reader opens --out in a loop while builds that replace it are SIGKILLed at random
    moments (and some finish): every open sees the complete old or the complete new datastore."""
    out = tmp_path / "ds"
    build(out, 5)
    sizes = {5}  # n_docs of every datastore that was ever complete at `out`
    failures: list[str] = []
    opens = 0
    stop = threading.Event()

    def read_in_a_loop():
        nonlocal opens
        while not stop.is_set():
            try:
                info = Datastore.open(out).info()
            except DatastoreError as exc:
                failures.append(str(exc))
                continue
            opens += 1
            if info.n_docs not in sizes and info.n_docs not in pending:
                failures.append(f"unexpected datastore of {info.n_docs} documents")

    missing = 0

    def look_in_a_tight_loop():  # a moment without `out` lasts microseconds: look often
        nonlocal missing
        manifest = out / "manifest.json"
        while not stop.is_set():
            if not os.path.exists(manifest):
                missing += 1

    pending: set[int] = set()
    reader = threading.Thread(target=read_in_a_loop)
    looker = threading.Thread(target=look_in_a_tight_loop)
    reader.start()
    looker.start()
    rng = random.Random(3)
    rounds = int(os.environ.get("REST_FAULT_ROUNDS", "12"))
    env = {**os.environ, "PYTHONPATH": ROOT}
    try:
        for i in range(rounds):
            n_docs = 40 + i
            pending.add(n_docs)
            proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(out), str(n_docs)], env=env)
            if i % 4 == 3:
                assert proc.wait(60) == 0  # some builds finish
            else:
                time.sleep(rng.uniform(0.2, 1.2))  # others are killed anywhere: start, SA, swap
                proc.send_signal(signal.SIGKILL)
                proc.wait(60)
            final = Datastore.open(out).info().n_docs
            assert final in sizes | {n_docs}
            sizes.add(final)
    finally:
        stop.set()
        reader.join(30)
        looker.join(30)
    assert failures == []
    assert missing == 0
    assert opens > 0
    build(out, 7, overwrite=True)
    assert temporaries(out) == []  # the killed builds' directories are gone
