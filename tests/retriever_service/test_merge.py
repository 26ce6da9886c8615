"""Merging the answers of servers that hold different shards."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rest.types import SearchParams, SearchResult
from retriever_service.merge import merge_results
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
