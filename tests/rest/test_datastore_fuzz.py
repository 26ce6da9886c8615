"""Fuzzing the datastore loader and the engine's search parameters (hypothesis).

The loader: a valid two-shard datastore, mutated (bytes flipped anywhere, header fields set to
any value with the header checksum recomputed so that the deeper checks are reached, files cut
or grown, manifest fields replaced by any JSON value), then opened, searched and verified. Every
outcome is a result or one of the documented exceptions with a one-line message, never a crash
or another exception. The search parameters: any integers (negative, huge), any context, any
shard list, both policies; every answer is a well-formed tree within its bounds.

Bounded for CI: ``REST_FUZZ_EXAMPLES`` examples per test (default 150, a few seconds each); set
it higher for a longer run. Inputs that once broke something stay below as ``@example`` cases.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rest import _engine
from rest.datastore import Datastore, DatastoreError, build_datastore
from rest.types import SearchParams

EXAMPLES = int(os.environ.get("REST_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
VOCAB = 12
HEADER_LEN = 512

# Header fields: (offset, struct format) as docs/DATASTORE_FORMAT.md lays them out.
HEADER_FIELDS = {
    "version": (8, "<I"), "token_width": (12, "<I"), "vocab_size": (16, "<I"),
    "n_tokens": (24, "<Q"), "n_docs": (32, "<Q"), "tokens_offset": (40, "<Q"),
    "sa_offset": (48, "<Q"), "tokens_checksum": (56, "<Q"), "sa_checksum": (64, "<Q"),
}
MANIFEST_FIELDS = ("format_version", "vocab_size", "token_width", "tokenizer_name",
                   "tokenizer_fingerprint", "n_tokens", "n_docs", "shards")
SHARD_FIELDS = ("name", "file", "n_tokens", "n_docs", "file_len", "tokens_checksum",
                "sa_checksum")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "ds"
    docs = [[(i * 5 + d) % VOCAB for i in range(30 + d)] for d in range(8)]
    build_datastore(path, docs, vocab_size=VOCAB, tokenizer_name="t", tokenizer_fingerprint="f",
                    shard_tokens=200)
    assert len(Datastore.open(path).shard_names) == 2
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=6,
)

mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("field"), st.integers(0, 1), st.sampled_from(sorted(HEADER_FIELDS)),
              st.integers(0, 2**64 - 1), st.booleans()),
    st.tuples(st.just("cut"), st.integers(0, 1), st.integers(0, 10**6)),
    st.tuples(st.just("grow"), st.integers(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("manifest"), st.sampled_from(MANIFEST_FIELDS), json_values),
    st.tuples(st.just("entry"), st.integers(0, 1), st.sampled_from(SHARD_FIELDS), json_values),
    st.tuples(st.just("duplicate"), st.integers(0, 1)),
)


def apply(directory: Path, mutation) -> None:
    kind = mutation[0]
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if kind in ("flip", "field", "cut", "grow"):
        shard = directory / f"shard-0000{mutation[1]}.rds"
        data = bytearray(shard.read_bytes())
        if kind == "flip" and data:
            data[mutation[2] % len(data)] ^= mutation[3]
        elif kind == "field":
            offset, fmt = HEADER_FIELDS[mutation[2]]
            size = struct.calcsize(fmt)
            data[offset:offset + size] = struct.pack(fmt, mutation[3] % (1 << (8 * size)))
            # The header checksum recomputed: the mutation reaches the checks behind it.
            data[504:512] = struct.pack("<Q", _engine.checksum(bytes(data[:504])))
            agreeable = isinstance(manifest, dict) and isinstance(manifest.get("shards"), list) \
                and len(manifest["shards"]) == 2 and all(isinstance(e, dict) for e in manifest["shards"])
            if mutation[4] and agreeable and mutation[2] in ("n_tokens", "n_docs"):  # manifest agrees
                entry = manifest["shards"][mutation[1]]
                entry[mutation[2]] = mutation[3]
                counts = [s.get(mutation[2]) for s in manifest["shards"]]
                if all(type(c) is int for c in counts):  # an earlier mutation may have broken one
                    manifest[mutation[2]] = sum(counts)
                manifest_path.write_text(json.dumps(manifest))
        elif kind == "cut":
            del data[mutation[2] % (len(data) + 1):]
        elif kind == "grow":
            data += mutation[2]
        shard.write_bytes(bytes(data))
    elif kind == "manifest":
        manifest[mutation[1]] = mutation[2]
        manifest_path.write_text(json.dumps(manifest))
    elif kind in ("entry", "duplicate"):
        shards = manifest.get("shards")
        if not (isinstance(shards, list) and len(shards) > mutation[1]
                and isinstance(shards[mutation[1]], dict)):
            return  # an earlier mutation replaced the shard list
        if kind == "entry":
            shards[mutation[1]][mutation[2]] = mutation[3]
        else:
            shards.append(shards[mutation[1]])
        manifest_path.write_text(json.dumps(manifest))


def check_tree(result, params: SearchParams, context) -> None:
    n = len(result.tokens)
    assert len(result.parents) == n == len(result.counts)
    assert 0 <= result.match_length <= min(params.max_span, len(context))
    depth = []
    for i, (token, parent, count) in enumerate(zip(result.tokens, result.parents, result.counts)):
        assert -1 <= parent < i and 0 <= token < VOCAB and count >= 1
        depth.append(1 if parent < 0 else depth[parent] + 1)
        assert depth[-1] <= params.max_depth
        if parent >= 0:
            assert count <= result.counts[parent]
    if params.policy == "exact":
        assert n <= params.budget
    roots = sum(c for c, p in zip(result.counts, result.parents) if p < 0)
    assert roots <= result.occurrences or params.policy == "rest"


def one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc), str(exc)


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3),
       st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), min_size=1,
                max_size=4))
@example([("field", 0, "n_tokens", 2**40, True)], [[1, 2]])  # huge count, manifest agreeing
@example([("field", 1, "sa_offset", 513, False)], [[1, 2]])  # a misaligned section
@example([("field", 0, "token_width", 4, False)], [[1]])  # width that does not fit the vocabulary
@example([("flip", 1, 10**6, 255)], [[3, 4, 5]])  # a suffix-array entry far out of range
@example([("duplicate", 0)], [[1, 2]])  # a shard listed twice
@example([("entry", 1, "file", "../x")], [[1]])  # a file outside the directory
@example([("manifest", "shards", [])], [[1]])
@example([("manifest", "shards", None), ("flip", 0, 0, 1)], [[0]])  # no shard list, then a flip
def test_mutated_datastores_are_refused_or_searched_safely(template, tmp_path_factory,
                                                          mutation_list, contexts):
    directory = Path(shutil.copytree(template, tmp_path_factory.mktemp("case") / "ds"))
    for mutation in mutation_list:
        apply(directory, mutation)
    try:
        ds = Datastore.open(directory, leases=False, inotify=False)
    except (DatastoreError, KeyError, ValueError) as exc:
        one_line(exc)
        return
    for context in contexts:
        for params in (SearchParams(min_span=1), SearchParams(min_span=1, policy="rest")):
            try:
                result = ds.search(context, params)
            except (ValueError, DatastoreError) as exc:
                one_line(exc)
                continue
            check_tree(result, params, context)
    try:
        ds.verify()
    except DatastoreError as exc:
        one_line(exc)


@pytest.fixture(scope="module")
def store(template) -> Datastore:
    return Datastore.open(template)


huge = st.integers(-2**70, 2**70)
reasonable = st.integers(0, 300)


@FUZZ
@given(context=st.lists(st.integers(-5, VOCAB + 5) | huge, max_size=12),
       min_span=reasonable | huge, max_span=reasonable | huge, budget=reasonable | huge,
       max_depth=reasonable | huge, policy=st.sampled_from(["exact", "rest", "REST", ""]),
       shards=st.none() | st.lists(st.sampled_from(["shard-00000", "shard-00001", "nope", ""]),
                                   max_size=3))
@example(context=[1, 2], min_span=1, max_span=2**64 - 1, budget=2**63, max_depth=2**64 - 1,
         policy="rest", shards=None)  # every bound at its largest
@example(context=[1, 2], min_span=1, max_span=16, budget=4096, max_depth=256, policy="exact",
         shards=["shard-00001", "shard-00001"])  # a shard named twice
@example(context=[0], min_span=1, max_span=1, budget=0, max_depth=1, policy="exact",
         shards=[])  # no shard named: refused (it once searched nothing and answered empty)
def test_any_search_parameters_are_refused_or_answered_in_bounds(store, context, min_span,
                                                                 max_span, budget, max_depth,
                                                                 policy, shards):
    query = (min_span, max_span, budget, max_depth, policy)
    try:
        raw, _, searched = store._native.search(context, query, shards)
    except (ValueError, KeyError, OverflowError, TypeError) as exc:
        one_line(exc)
        return
    params = SearchParams.__new__(SearchParams)  # the bounds as given, unchecked
    object.__setattr__(params, "max_span", max_span)
    object.__setattr__(params, "max_depth", max_depth)
    object.__setattr__(params, "budget", budget)
    object.__setattr__(params, "policy", policy)
    from rest.types import SearchResult

    check_tree(SearchResult(*raw), params, context)
    assert searched == (sorted(set(shards)) if shards is not None else store.shard_names)
