"""Merging the answers of servers that hold different shards."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rest.datastore import Datastore, build_datastore
from rest.retriever import RetrievalSession
from rest.types import SearchParams, SearchResult
from retriever_service.merge import merge_levels, merge_results, merge_with_bounds
from tests.retriever_service.service_testing import VOCAB, random_contexts


def tree(match_length, occurrences, nodes, shard=""):
    """``nodes``: (token, parent, count) triples."""
    tokens, parents, counts = zip(*nodes) if nodes else ((), (), ())
    return SearchResult(match_length, occurrences, tokens, parents, counts, shard)


def test_the_longest_match_wins_and_shorter_answers_are_dropped():
    a = tree(3, 2, [(7, -1, 2)], "shard-00000")
    b = tree(2, 9, [(8, -1, 9)], "shard-00001")
    assert merge_results([a, b], budget=64) == a


def test_identical_paths_are_summed_and_occurrences_added():
    a = tree(2, 3, [(5, -1, 3), (6, 0, 2)], "shard-00000")
    b = tree(2, 4, [(5, -1, 1), (9, -1, 3), (6, 0, 1)], "shard-00001")
    merged = merge_results([a, b], budget=64)
    assert merged.match_length == 2
    assert merged.occurrences == 7
    assert dict(zip(merged.paths(), merged.counts)) == {(5,): 4, (9,): 3, (5, 6): 3}
    assert merged.shard == "shard-00000,shard-00001"


def test_reprune_is_best_first_with_parents_before_children():
    a = tree(2, 10, [(1, -1, 6), (2, 0, 5), (3, -1, 4)])
    b = tree(2, 10, [(3, -1, 5), (4, -1, 5)])
    merged = merge_results([a, b], budget=3)
    # counts: (3,)=9, (1,)=6, (1,2)=5, (4,)=5; ties at 5: shallower first, so (4,) before (1,2)
    assert merged.paths() == [(3,), (1,), (4,)]
    assert merged.counts == (9, 6, 5)
    assert merged.parents == (-1, -1, -1)


def test_equal_counts_and_depth_tie_break_on_parent_then_token():
    a = tree(2, 4, [(9, -1, 2), (8, -1, 2), (7, 0, 1), (6, 1, 1)])
    b = tree(2, 1, [(8, -1, 1), (5, 0, 1)])
    merged = merge_results([a, b], budget=64)
    # roots: 8 (count 3) before 9 (count 2); then children at count 1: parent 8's first (index 0),
    # by token: 5, 6; then parent 9's child 7.
    assert merged.paths() == [(8,), (9,), (8, 5), (8, 6), (9, 7)]


def test_no_match_anywhere_is_the_empty_result():
    assert merge_results([tree(0, 0, []), tree(0, 0, [])], budget=8) == SearchResult(0, 0)


def test_budget_zero_keeps_match_and_occurrences():
    merged = merge_results([tree(2, 1, [(1, -1, 1)]), tree(2, 2, [(1, -1, 2)])], budget=0)
    assert (merged.match_length, merged.occurrences, merged.tokens) == (2, 3, ())


# --- against the engine: shards searched apart and merged == the datastore searched whole --------

def split_search(datastore, context, params):
    per_shard = SearchParams(params.min_span, params.max_span, 4096, params.max_depth, "exact")
    answers = [datastore.search(context, per_shard, shards=[s]) for s in datastore.shard_names]
    return merge_results(answers, params.budget)


@settings(max_examples=60, deadline=None, print_blob=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([1, 4, 16, 64]),
       max_depth=st.integers(1, 6), min_span=st.integers(1, 3))
def test_merging_unpruned_shard_trees_equals_searching_all_shards(
    datastore, documents, seed, budget, max_depth, min_span
):  # (the fixtures are session-scoped: sharing them across examples is intended)
    # Unpruned per-shard trees (budget 4096 covers them here) make the merge exact, so the merged
    # tree pruned to `budget` must be the engine's own answer, order and tie-breaks included.
    params = SearchParams(min_span=min_span, max_span=12, budget=budget, max_depth=max_depth)
    for context in random_contexts(documents, 5, seed):
        whole = datastore.search(context, params)
        merged = split_search(datastore, context, params)
        assert merged.match_length == whole.match_length
        assert merged.occurrences == whole.occurrences
        assert (merged.tokens, merged.parents, merged.counts) == (
            whole.tokens, whole.parents, whole.counts), context


def test_merge_of_pruned_trees_is_a_valid_tree_with_exact_match(datastore, documents):
    params = SearchParams(min_span=1, max_span=8, budget=6, max_depth=4)
    for context in random_contexts(documents, 60, seed=7):
        whole = datastore.search(context, params)
        answers = [datastore.search(context, params, shards=[s]) for s in datastore.shard_names]
        merged = merge_results(answers, params.budget)
        assert (merged.match_length, merged.occurrences) == (whole.match_length, whole.occurrences)
        assert len(merged) <= params.budget
        assert all(p < i for i, p in enumerate(merged.parents))  # parents before children
        unpruned = datastore.search(context, SearchParams(1, 8, 4096, 4))
        true_counts = dict(zip(unpruned.paths(), unpruned.counts))
        for path, count in zip(merged.paths(), merged.counts):
            assert count <= true_counts[path]  # never more than the truth: pruning only loses


@pytest.mark.parametrize("token", [VOCAB - 1])
def test_unmatched_token_merges_to_nothing(datastore, token):
    params = SearchParams(min_span=1)
    answers = [datastore.search([token], params, shards=[s]) for s in datastore.shard_names]
    assert merge_results(answers, params.budget) == SearchResult(0, 0)


# --- shards that prune: exact where certified, bounded always ------------------------------------

def with_cut(pruned: SearchResult, unpruned: SearchResult) -> SearchResult:
    """``pruned`` with its ``cut_count`` (what the service reports): the largest count of a node
    of the unpruned tree that the budget left out."""
    kept = set(pruned.paths())
    cut = max((c for p, c in zip(unpruned.paths(), unpruned.counts) if p not in kept), default=0)
    if pruned.cut_count:
        assert pruned.cut_count == cut  # the engine reports it itself
    return replace(pruned, cut_count=cut)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, documents):
    """The test documents in eight or so shards, for many layouts of them over servers."""
    path = tmp_path_factory.mktemp("many") / "ds"
    build_datastore(path, documents, vocab_size=VOCAB, tokenizer_name="test-tokenizer",
                    tokenizer_fingerprint="f" * 32, shard_tokens=2500)
    datastore = Datastore.open(path)
    assert len(datastore.shard_names) >= 6
    return datastore


def server_answer(datastore, shards, context, params) -> SearchResult:
    """What a server holding ``shards`` answers, ``cut_count`` included."""
    pruned = datastore.search(context, params, shards=shards)
    unpruned = datastore.search(context, replace(params, budget=4096), shards=shards)
    assert len(unpruned) < 4096
    return with_cut(pruned, unpruned)


layouts = st.lists(st.integers(0, 3), min_size=1, max_size=16)  # a server number per shard


@settings(max_examples=80, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts, seed=st.integers(0, 10_000), budget=st.sampled_from([1, 3, 8, 16]),
       max_depth=st.integers(1, 5), min_span=st.integers(1, 3))
def test_merging_pruned_shard_trees_is_exact_where_certified_and_bounded_always(
    many_shards, documents, layout, seed, budget, max_depth, min_span
):
    datastore = many_shards
    names = datastore.shard_names
    servers: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        servers.setdefault(layout[i % len(layout)], []).append(name)
    params = SearchParams(min_span=min_span, max_span=12, budget=budget, max_depth=max_depth)
    for context in random_contexts(documents, 4, seed):
        answers = [server_answer(datastore, group, context, params) for group in servers.values()]
        merged = merge_with_bounds(answers, budget)
        result = merged.result
        whole = datastore.search(context, params)
        truth = datastore.search(context, replace(params, budget=4096))
        true_counts = dict(zip(truth.paths(), truth.counts))
        assert (result.match_length, result.occurrences) == (whole.match_length,
                                                             whole.occurrences)
        assert len(result) <= budget and all(p < i for i, p in enumerate(result.parents))
        for path, low, high in zip(result.paths(), result.counts, merged.upper):
            assert low <= true_counts[path] <= high  # never more than the truth, within bounds
        kept = set(result.paths())
        left_out = [c for p, c in true_counts.items() if p not in kept]
        assert max(left_out, default=0) <= result.cut_count  # the merged answer's own bound
        if not any(a.cut_count for a in answers):
            assert merged.exact  # no server pruned: nothing can be missing
        if merged.exact:
            assert (result.tokens, result.parents, result.counts) == (
                whole.tokens, whole.parents, whole.counts), (layout, context)
        event("exact" if merged.exact else "bounded")
        if (result.tokens, result.parents, result.counts) != (whole.tokens, whole.parents,
                                                              whole.counts):
            event("differs from the whole datastore's tree (not certified)")


def test_a_node_that_every_server_cut_is_bounded_not_lost_silently():
    """Budget 1: each server keeps its own favourite (5) and cuts the shared one (4 + 4): the
    whole datastore's tree is the shared node (8). The merge cannot know it, says so, and its
    cut count bounds what it missed."""
    a = tree(2, 10, [(1, -1, 5)], "")
    b = tree(2, 10, [(2, -1, 5)], "")
    a, b = replace(a, cut_count=4), replace(b, cut_count=4)
    merged = merge_with_bounds([a, b], budget=1)
    assert merged.result.paths() == [(1,)] and merged.result.counts == (5,)
    assert merged.upper == (9,)  # 5 here, and up to 4 that the other server cut
    assert not merged.exact
    assert merged.result.cut_count == 9  # node (2,): 5 + 4; the shared node: 4 + 4 = 8
    # The same answers with nothing cut are exact.
    whole = merge_with_bounds([replace(a, cut_count=0), replace(b, cut_count=0)], budget=1)
    assert whole.exact and whole.result.cut_count == 5


def test_merged_levels_go_by_match_length(datastore, documents):
    """Each server's back-off levels merge with the other servers' levels of the same match
    length, whatever their own longest match: equal to the whole datastore's levels."""
    params = SearchParams(min_span=1, max_span=12, budget=4096, max_depth=4)
    names = datastore.shard_names
    for context in random_contexts(documents, 40, seed=19):
        answers = [ShardSession(datastore, [name]).search_levels(context, params, 3)
                   for name in names]
        merged = merge_levels(answers, params.budget, 3)
        whole = ShardSession(datastore, None).search_levels(context, params, 3)
        assert [(m.match_length, m.occurrences, m.tokens, m.parents, m.counts) for m in merged] \
            == [(w.match_length, w.occurrences, w.tokens, w.parents, w.counts) for w in whole]


class ShardSession(RetrievalSession):
    """Searches of some shards, with the base class's back-off levels (one search each)."""

    def __init__(self, datastore, shards) -> None:
        self.datastore = datastore
        self.shards = shards

    def search(self, context, params):
        return self.datastore.search(context, params, shards=self.shards)
