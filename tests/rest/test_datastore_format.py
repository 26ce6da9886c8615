"""Datastore format v1: round trips, document boundaries, and refusal of every kind of bad file."""

import json
import os
import struct
from dataclasses import replace

import pytest

from rest.datastore import Datastore, DatastoreError, build_datastore
from rest.types import SearchParams


def build(path, docs, vocab_size, **kw):
    build_datastore(path, docs, vocab_size=vocab_size, tokenizer_name="tok", tokenizer_fingerprint="abc123", **kw)
    return Datastore.open(path)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "ds"
    build(path, [[1, 2, 3, 4], [1, 2, 5], [3, 4, 1, 2, 3]], 10)
    return path


def shard_file(path):
    return path / "shard-00000.rds"


def test_info_round_trips_the_header_and_manifest(store):
    info = Datastore.open(store).info()
    assert (info.format_version, info.vocab_size, info.n_docs) == (1, 10, 3)
    assert info.n_tokens == 4 + 3 + 5 + 3  # tokens plus one separator per document
    assert (info.tokenizer_name, info.tokenizer_fingerprint, info.shards) == ("tok", "abc123", ("shard-00000",))
    Datastore.open(store).verify()


@pytest.mark.parametrize("vocab_size,width", [(65_535, 2), (65_536, 4), (200_000, 4)])
def test_token_width_follows_the_vocabulary(tmp_path, vocab_size, width):
    top = vocab_size - 1
    ds = build(tmp_path / "ds", [[top, 7, top, 9], [7, top, 8]], vocab_size)
    assert ds.manifest()["token_width"] == width
    r = ds.search([7, top])
    assert (r.match_length, r.tokens, r.counts) == (2, (8, 9), (1, 1))
    ds.verify()


def test_large_vocabulary_ids_round_trip(tmp_path):
    ids = [70_000, 151_000, 3, 151_642]
    ds = build(tmp_path / "ds", [ids + [5], ids + [6]], 151_643)
    assert ds.search(ids).tokens == (5, 6)


def test_out_of_range_ids_are_refused(store, tmp_path):
    ds = Datastore.open(store)
    with pytest.raises(ValueError, match="token 10 at position 1 is outside the vocabulary"):
        ds.search([1, 10])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ds.search([-1, 2])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build(tmp_path / "bad", [[1, 99]], 10)
    assert not (tmp_path / "bad").exists()


def test_empty_context_and_bad_parameters_are_refused(store):
    ds = Datastore.open(store)
    with pytest.raises(ValueError, match="context is empty"):
        ds.search([])
    with pytest.raises(ValueError, match="min_span"):
        ds._native.search([1, 2], (3, 2, 64, 10, "exact"), None)
    with pytest.raises(ValueError, match="policy"):
        ds._native.search([1, 2], (2, 16, 64, 10, "fastest"), None)


def test_empty_datastore_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no documents"):
        build(tmp_path / "empty", [], 10)
    with pytest.raises(ValueError, match="no documents"):
        build(tmp_path / "empty", [[], []], 10)
    assert not (tmp_path / "empty").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_existing_output_is_not_overwritten_by_default(store):
    with pytest.raises(ValueError, match="already exists"):
        build(store, [[1, 2]], 10)
    build(store, [[1, 2]], 10, overwrite=True)
    assert Datastore.open(store).info().n_docs == 1


def test_an_interrupted_build_leaves_nothing_that_opens(tmp_path):
    def documents():
        yield [1, 2, 3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_datastore(tmp_path / "ds", documents(), vocab_size=10, tokenizer_name="t", tokenizer_fingerprint="f")
    assert list(tmp_path.iterdir()) == []


def test_documents_larger_than_a_shard_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not fit in a shard"):
        build(tmp_path / "ds", [list(range(9))], 10, shard_tokens=5)


def test_many_shards_search_as_one(tmp_path):
    docs = [[1, 2, 3], [1, 2, 3], [1, 2, 4], [5, 1, 2, 3]]
    one = build(tmp_path / "one", docs, 10)
    many = build(tmp_path / "many", docs, 10, shard_tokens=5)
    assert len(many.shard_names) == 4
    for context in ([1, 2], [5, 1, 2], [2, 3]):
        result = many.search(context)
        assert result.searched_shards == tuple(many.shard_names)
        assert one.search(context) == replace(result, searched_shards=("shard-00000",))


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(DatastoreError, match="manifest.json"):
        Datastore.open(tmp_path / "nowhere")


# Corruption: each is refused with a message naming the file and the problem, never a crash.

def corrupt_byte(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = value if value is not None else data[offset] ^ 0xFF
    path.write_bytes(bytes(data))


def test_bad_magic(store):
    corrupt_byte(shard_file(store), 0, ord("X"))
    with pytest.raises(DatastoreError, match=r"shard-00000\.rds: not a datastore shard \(bad magic"):
        Datastore.open(store)


def test_wrong_version(store):
    f = shard_file(store)
    data = bytearray(f.read_bytes())
    data[8:12] = struct.pack("<I", 2)
    f.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match="unsupported format version 2"):
        Datastore.open(store)


def test_header_checksum(store):
    corrupt_byte(shard_file(store), 20)
    with pytest.raises(DatastoreError, match="checksum mismatch in header"):
        Datastore.open(store)


@pytest.mark.parametrize("keep", [0, 100, 511, 600, -1])
def test_truncated_shard(store, keep):
    f = shard_file(store)
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data + b"\0")
    with pytest.raises(DatastoreError, match=r"shard-00000\.rds: truncated"):
        Datastore.open(store)


def test_token_and_suffix_array_corruption_found_by_verify(store):
    f = shard_file(store)
    size = os.path.getsize(f)
    corrupt_byte(f, 512)  # first token
    ds = Datastore.open(store)  # opening stays instant: it checks only the header
    with pytest.raises(DatastoreError, match="checksum mismatch in tokens"):
        ds.verify()
    corrupt_byte(f, 512)  # restore
    corrupt_byte(f, size - 1)  # a suffix-array entry now points far outside the text
    ds = Datastore.open(store)
    ds.search([1, 2], SearchParams(min_span=1))  # wrong answers at worst, never a crash
    with pytest.raises(DatastoreError, match="checksum mismatch in suffix array"):
        ds.verify()


def test_manifest_problems(store):
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text("{not json")
    with pytest.raises(DatastoreError, match="unreadable manifest"):
        Datastore.open(store)
    bad = dict(manifest, tokenizer_fingerprint="other")
    (store / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DatastoreError, match="tokenizer fingerprint differs from the manifest"):
        Datastore.open(store)
    bad = dict(manifest, shards=[dict(manifest["shards"][0], file="../escape.rds")])
    (store / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(DatastoreError, match="bad shard file name"):
        Datastore.open(store)
    (store / "manifest.json").write_text(json.dumps(manifest))
    (store / "shard-00000.rds").unlink()
    with pytest.raises(DatastoreError, match="shard-00000.rds"):
        Datastore.open(store)


def test_building_from_one_flat_array_equals_building_from_documents(tmp_path):
    import numpy as np

    from rest.datastore import build_datastore_from_array

    docs = [[1, 2, 3, 4], [1, 2, 5], [3, 4, 1, 2, 3]]
    build_datastore_from_array(tmp_path / "flat", np.concatenate([np.array(d) for d in docs]), [len(d) for d in docs],
                               vocab_size=10, tokenizer_name="tok", tokenizer_fingerprint="abc123")
    flat, listed = Datastore.open(tmp_path / "flat"), build(tmp_path / "list", docs, 10)
    assert flat.manifest()["shards"][0]["tokens_checksum"] == listed.manifest()["shards"][0]["tokens_checksum"]
    assert flat.search([1, 2]) == listed.search([1, 2])
    with pytest.raises(ValueError, match="doc_lengths must sum"):
        build_datastore_from_array(tmp_path / "bad", np.array([1, 2, 3]), [2], vocab_size=10,
                                   tokenizer_name="t", tokenizer_fingerprint="f")
    assert not (tmp_path / "bad").exists()
