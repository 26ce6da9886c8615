"""The manifest is checked field by field against the shard headers, and only regular files of a
bounded size are read: every refusal is one clear error, and nothing hangs or grows."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rest.datastore import Datastore, DatastoreError, build_datastore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "ds"
    docs = [[1, 2, 3, 4], [1, 2, 5], [3, 4, 1, 2, 3], [5, 5, 1]]
    build_datastore(path, docs, vocab_size=10, tokenizer_name="tok", tokenizer_fingerprint="abc123",
                    shard_tokens=8)
    assert len(Datastore.open(path).shard_names) >= 2
    return path


def manifest(store) -> dict:
    return json.loads((store / "manifest.json").read_text())


def write_manifest(store, value: dict) -> None:
    (store / "manifest.json").write_text(json.dumps(value))


def refused(store, match: str) -> None:
    with pytest.raises(DatastoreError, match=match):
        Datastore.open(store)


def test_a_shard_listed_twice_is_refused(store):
    m = manifest(store)
    first = m["shards"][0]
    twice = dict(m, shards=[first, *m["shards"]], n_tokens=m["n_tokens"] + first["n_tokens"],
                 n_docs=m["n_docs"] + first["n_docs"])
    write_manifest(store, twice)
    refused(store, r'shard "shard-00000" is listed twice')
    # The same file under another name doubles every count just as well.
    renamed = dict(first, name="again")
    write_manifest(store, dict(twice, shards=[first, renamed, *m["shards"][1:]]))
    refused(store, r'shard file "shard-00000.rds" is listed twice')


def test_totals_must_be_the_sums_over_the_shards(store):
    m = manifest(store)
    write_manifest(store, dict(m, n_tokens=m["n_tokens"] * 2))
    refused(store, "manifest totals .* are not the sums over its shards")
    write_manifest(store, dict(m, n_docs=m["n_docs"] + 1))
    refused(store, "not the sums over its shards")


@pytest.mark.parametrize("field,value,message", [
    ("tokenizer_name", "other", "tokenizer name differs from the manifest"),
    ("tokenizer_fingerprint", "other", "tokenizer fingerprint differs from the manifest"),
    ("vocab_size", 11, "vocabulary size differs from the manifest"),
    ("token_width", 4, "manifest token width 4 does not fit its vocabulary size 10"),
    ("vocab_size", 70_000, "manifest token width 2 does not fit its vocabulary size 70000"),
])
def test_every_manifest_field_is_checked_against_the_headers(store, field, value, message):
    write_manifest(store, dict(manifest(store), **{field: value}))
    refused(store, message)


@pytest.mark.parametrize("field,value,message", [
    ("n_tokens", 1, "size differs from the manifest"),
    ("file_len", 1, "size differs from the manifest"),
    ("tokens_checksum", "0" * 16, "checksum differs from the manifest"),
    ("name", "", "bad shard name"),
    ("file", "", "bad shard file name"),
])
def test_every_shard_entry_is_checked(store, field, value, message):
    m = manifest(store)
    shards = [dict(m["shards"][0], **{field: value}), *m["shards"][1:]]
    delta = value - m["shards"][0][field] if field == "n_tokens" else 0
    write_manifest(store, dict(m, shards=shards, n_tokens=m["n_tokens"] + delta))
    refused(store, message)


def open_in_subprocess(path, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Datastore.open in a child process with a time limit: a hang or unbounded growth fails the
    test instead of the test run. Memory is capped at 1 GiB (ulimit -v)."""
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from rest.datastore import Datastore, DatastoreError
        try:
            Datastore.open({str(path)!r})
        except DatastoreError as exc:
            print(exc)
            sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})


def test_a_fifo_manifest_is_refused_without_waiting(store):
    (store / "manifest.json").unlink()
    os.mkfifo(store / "manifest.json")
    done = open_in_subprocess(store)
    assert done.returncode == 3, done.stderr
    assert "manifest.json: corrupt datastore: not a regular file" in done.stdout


def test_a_device_manifest_is_refused_without_reading_it(store):
    (store / "manifest.json").unlink()
    (store / "manifest.json").symlink_to("/dev/zero")
    done = open_in_subprocess(store)
    assert done.returncode == 3, done.stderr
    assert "not a regular file" in done.stdout


def test_a_fifo_or_device_shard_is_refused_without_waiting(store):
    shard = store / "shard-00001.rds"
    shard.unlink()
    os.mkfifo(shard)
    done = open_in_subprocess(store)
    assert done.returncode == 3, done.stderr
    assert "shard-00001.rds: corrupt datastore: not a regular file" in done.stdout
    shard.unlink()
    shard.symlink_to("/dev/zero")
    done = open_in_subprocess(store)
    assert done.returncode == 3 and "not a regular file" in done.stdout, done


def test_a_huge_manifest_is_refused_unread(store):
    with open(store / "manifest.json", "wb") as f:
        f.truncate(17 << 20)  # sparse: no disk, but 17 MiB to read
    refused(store, r"manifest.json: corrupt datastore: 17825792 bytes is more than the 16777216")
