"""rest/datastore.py search against the brute-force reference (tests/rest/reference.py)."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rest.datastore import Datastore, build_datastore
from rest.types import SearchParams
from tests.rest import reference

_counter = itertools.count()


def build(tmp_path, docs, vocab_size, shard_tokens=None):
    out = tmp_path / f"ds{next(_counter)}"
    build_datastore(out, docs, vocab_size=vocab_size, tokenizer_name="test", tokenizer_fingerprint="fp",
                    shard_tokens=shard_tokens)
    return Datastore.open(out)


def as_tuple(result):
    return (result.match_length, result.occurrences, list(result.tokens), list(result.parents), list(result.counts))


@st.composite
def corpora(draw, max_vocab=6, max_doc=40, max_docs=8):
    vocab = draw(st.integers(2, max_vocab))
    docs = draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=max_doc), min_size=1, max_size=max_docs))
    longest = max(len(d) for d in docs) + 1
    shard_tokens = draw(st.sampled_from([None, longest, longest + 7, 2 * longest]))
    return vocab, docs, shard_tokens


@st.composite
def queries(draw, vocab, docs):
    # Half the contexts end with a piece of a document, so that long matches happen.
    if draw(st.booleans()):
        doc = draw(st.sampled_from(docs))
        end = draw(st.integers(1, len(doc)))
        start = draw(st.integers(0, end - 1))
        context = draw(st.lists(st.integers(0, vocab - 1), max_size=3)) + doc[start:end]
    else:
        context = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
    min_span = draw(st.integers(1, 3))
    max_span = draw(st.integers(min_span, 8))
    params = SearchParams(min_span=min_span, max_span=max_span, budget=draw(st.integers(0, 24)),
                          max_depth=draw(st.integers(1, 6)))
    return context, params


@settings(max_examples=150)
@given(data=st.data())
def test_exact_policy_matches_reference(tmp_path_factory, data):
    vocab, docs, shard_tokens = data.draw(corpora())
    ds = build(tmp_path_factory.mktemp("x"), docs, vocab, shard_tokens)
    for _ in range(5):
        context, p = data.draw(queries(vocab, docs))
        expected = reference.exact_search(docs, context, p.min_span, p.max_span, p.budget, p.max_depth)
        assert as_tuple(ds.search(context, p)) == expected


@settings(max_examples=100)
@given(data=st.data())
def test_levels_and_cut_counts_match_reference(tmp_path_factory, data):
    vocab, docs, shard_tokens = data.draw(corpora())
    ds = build(tmp_path_factory.mktemp("x"), docs, vocab, shard_tokens)
    for _ in range(5):
        context, p = data.draw(queries(vocab, docs))
        levels = data.draw(st.integers(1, 4))
        expected = reference.exact_levels(docs, context, levels, p.min_span, p.max_span, p.budget,
                                          p.max_depth)
        found = ds.search_levels(context, p, levels)
        assert [(as_tuple(r), r.cut_count) for r in found] == expected
        alone = reference.exact_search_with_cut(docs, context, p.min_span, p.max_span, p.budget,
                                                p.max_depth)
        assert (as_tuple(ds.search(context, p)), ds.search(context, p).cut_count) == alone


@settings(max_examples=60)
@given(data=st.data())
def test_session_searches_equal_stateless_searches(tmp_path_factory, data):
    """A session's contexts grow by pieces of the documents (accepted drafts) and by random
    tokens (rejected ones), and sometimes jump; every answer equals the stateless one."""
    vocab, docs, shard_tokens = data.draw(corpora())
    ds = build(tmp_path_factory.mktemp("x"), docs, vocab, shard_tokens)
    session = ds.session()
    _, params = data.draw(queries(vocab, docs))
    levels = data.draw(st.integers(1, 3))
    context = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4))
    for _ in range(12):
        step = data.draw(st.sampled_from(["document", "token", "jump"]))
        if step == "document":
            doc = data.draw(st.sampled_from(docs))
            start = data.draw(st.integers(0, len(doc) - 1))
            context = context + doc[start : start + data.draw(st.integers(1, 4))]
        elif step == "token":
            context = context + [data.draw(st.integers(0, vocab - 1))]
        else:
            context = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6))
        assert session.search_levels(context, params, levels) == ds.search_levels(context, params, levels)
        assert session.search(context, params) == ds.search(context, params)


@settings(max_examples=100)
@given(data=st.data())
def test_rest_policy_matches_reference(tmp_path_factory, data):
    vocab, docs, shard_tokens = data.draw(corpora())
    ds = build(tmp_path_factory.mktemp("x"), docs, vocab, shard_tokens)
    shards = reference.shard_documents(docs, shard_tokens or 1 << 28)
    for _ in range(5):
        context, p = data.draw(queries(vocab, docs))
        p = SearchParams(p.min_span, p.max_span, p.budget, p.max_depth, policy="rest")
        expected = reference.rest_search(shards, context, p.min_span, p.max_span, p.budget, p.max_depth)
        assert as_tuple(ds.search(context, p)) == expected


@settings(max_examples=40)
@given(data=st.data())
def test_large_intervals_sampling_stays_exact(tmp_path_factory, data):
    """Long documents over 2-3 symbols give intervals far larger than the budget, where the
    engine splits intervals by sampling first: the result must still be exactly the reference's."""
    vocab = data.draw(st.integers(2, 3))
    docs = data.draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=200, max_size=900), min_size=1, max_size=4))
    shard_tokens = data.draw(st.sampled_from([None, 1000]))
    ds = build(tmp_path_factory.mktemp("x"), docs, vocab, shard_tokens)
    for _ in range(3):
        context = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4))
        p = SearchParams(min_span=1, max_span=data.draw(st.integers(1, 3)), budget=data.draw(st.integers(1, 12)),
                         max_depth=data.draw(st.integers(1, 4)))
        expected = reference.exact_search(docs, context, p.min_span, p.max_span, p.budget, p.max_depth)
        assert as_tuple(ds.search(context, p)) == expected


def test_rest_policy_counts_only_the_first_5000_occurrences(tmp_path):
    import random

    rng = random.Random(7)
    docs = [[rng.randrange(2) for _ in range(4000)] for _ in range(6)]
    ds = build(tmp_path, docs, 2)
    context = [0, 1]
    p = SearchParams(min_span=2, max_span=2, budget=16, max_depth=4, policy="rest")
    got = ds.search(context, p)
    assert got.occurrences > 5000  # the cap matters here
    expected = reference.rest_search([docs], context, 2, 2, 16, 4, key_len=96)
    assert as_tuple(got) == expected
    # The exact policy counts every occurrence: the root children's counts sum to them all.
    exact = ds.search(context, SearchParams(min_span=2, max_span=2, budget=16, max_depth=4))
    assert sum(c for c, par in zip(exact.counts, exact.parents) if par == -1) == exact.occurrences


# Tie-breaks, as the specification states them.

def test_most_frequent_continuation_comes_first(tmp_path):
    ds = build(tmp_path, [[1, 2, 5], [1, 2, 3], [1, 2, 3]], 8)
    r = ds.search([1, 2], SearchParams(max_depth=1))
    assert r.tokens == (3, 5) and r.counts == (2, 1)


def test_equal_counts_shallower_first_then_smaller_token(tmp_path):
    ds = build(tmp_path, [[1, 2, 7, 4], [1, 2, 6, 4]], 8)
    r = ds.search([1, 2], SearchParams(max_depth=2))
    # Both children have count 1: depth 1 before depth 2, token 6 before token 7; then the
    # grandchildren in the order of their parents.
    assert r.tokens == (6, 7, 4, 4)
    assert r.parents == (-1, -1, 0, 1)


def test_budget_and_depth_bound_the_tree(tmp_path):
    ds = build(tmp_path, [list(range(20))], 32)
    assert len(ds.search([0, 1], SearchParams(budget=5))) == 5
    assert ds.search([0, 1], SearchParams(max_depth=3)).tokens == (2, 3, 4)


def test_continuations_never_cross_document_boundaries(tmp_path):
    ds = build(tmp_path, [[1, 2, 3], [4, 5, 6]], 8)
    r = ds.search([1, 2, 3])
    assert r.match_length == 3 and r.tokens == ()
    assert ds.search([3, 4], SearchParams(min_span=2)).match_length == 0


def test_longest_suffix_wins(tmp_path):
    ds = build(tmp_path, [[9, 1, 2, 3, 4], [1, 2, 3, 5], [2, 3, 6]], 16)
    r = ds.search([9, 1, 2, 3])
    assert (r.match_length, r.occurrences, r.tokens) == (4, 1, (4,))
    r = ds.search([0, 1, 2, 3])
    assert (r.match_length, r.occurrences, r.tokens) == (3, 2, (4, 5))


def test_no_match_below_min_span(tmp_path):
    ds = build(tmp_path, [[1, 2, 3]], 8)
    r = ds.search([7, 3], SearchParams(min_span=2))
    assert (r.match_length, r.occurrences, r.tokens) == (0, 0, ())


def test_batch_equals_single_searches(tmp_path):
    import random

    rng = random.Random(1)
    docs = [[rng.randrange(5) for _ in range(60)] for _ in range(10)]
    ds = build(tmp_path, docs, 5, shard_tokens=130)
    contexts = [[rng.randrange(5) for _ in range(rng.randrange(1, 8))] for _ in range(50)]
    for policy in ("exact", "rest"):
        p = SearchParams(min_span=1, policy=policy, budget=16)
        assert ds.search_batch(contexts, p) == [ds.search(c, p) for c in contexts]


def test_searching_one_shard(tmp_path):
    ds = build(tmp_path, [[1, 2, 3], [1, 2, 4]], 8, shard_tokens=4)
    assert ds.shard_names == ["shard-00000", "shard-00001"]
    assert ds.search([1, 2]).tokens == (3, 4)
    assert ds.search([1, 2], shards=["shard-00001"]).tokens == (4,)
    with pytest.raises(KeyError, match="shard-00009"):
        ds.search([1, 2], shards=["shard-00009"])
