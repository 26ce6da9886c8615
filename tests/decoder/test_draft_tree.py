"""decoder/draft_tree.py: levels, their chain scoring into one tree, pruning, linearising."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder.draft_tree import DraftTree, Level, count_trie
from tests.decoder.trees import assert_same_tree


def paths(tree: DraftTree) -> dict[tuple[int, ...], float]:
    return dict(zip(tree_paths(tree), tree.scores))


def tree_paths(tree: DraftTree) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for token, parent in zip(tree.tokens, tree.parents):
        out.append((out[parent] if parent >= 0 else ()) + (token,))
    return out


def rows_level(match_length, continuations, trust):
    return Level.from_continuations(match_length, continuations, trust)


def trie_level(match_length, continuations, trust, extra_occurrences=0):
    """The same counts as ``rows_level``, as a datastore would give them (a counted trie)."""
    tokens, parents, counts = count_trie(continuations)
    occurrences = len(continuations) + extra_occurrences
    return Level.from_trie(match_length, occurrences, tokens, parents, counts, trust)


# --- levels -----------------------------------------------------------------------------------


def test_count_trie_counts_the_sequences_through_each_node() -> None:
    assert count_trie([[5, 6], [5, 7], [8]]) == ([5, 6, 7, 8], [-1, 0, 0, -1], [2, 1, 1, 1])
    assert count_trie([]) == ([], [], [])


def test_a_level_counts_its_paths_in_either_shape() -> None:
    continuations = [[7, 8], [7, 8], [7], [9, -1, 4]]  # a row ends at its first negative token
    want = {(7,): 3.0, (7, 8): 2.0, (9,): 1.0}
    level = rows_level(2, continuations, 1.0)
    assert level.counts() == want and level.occurrences == 4 and len(level) == 4
    trie = Level.from_trie(2, 4, (7, 8, 9), (-1, 0, -1), (3, 2, 1), 1.0)
    assert trie.counts() == want and len(trie) == 3


def test_levels_reject_malformed_input() -> None:
    with pytest.raises(ValueError, match="either"):
        Level(1, 1, 0.0)
    with pytest.raises(ValueError, match="as many"):
        Level.from_trie(1, 2, (1, 2), (-1,), (1, 1), 0.0)
    with pytest.raises(ValueError, match="trust"):
        rows_level(1, [[1]], -1.0)
    # A parent after its child is caught when the trie is merged.
    bad = Level.from_trie(1, 2, (1, 2), (1, -1), (1, 1), 0.0)
    with pytest.raises(ValueError, match="parent"):
        DraftTree.from_levels([bad])


# --- chain scoring on tiny inputs --------------------------------------------------------------


def test_one_fully_trusted_level_scores_by_relative_frequency() -> None:
    # 4 occurrences: 3 continue with 7 (2 of those with 8), 1 with 9.
    level = rows_level(2, [[7, 8], [7, 8], [7], [9]], trust=0.0)
    assert paths(DraftTree.from_levels([level])) == pytest.approx(
        {(7,): 0.75, (7, 8): 0.5, (9,): 0.25}
    )


def test_trust_is_the_occurrences_needed_to_half_believe_a_level() -> None:
    level = rows_level(2, [[7, 8], [7, 8], [7], [9]], trust=4.0)
    scores = paths(DraftTree.from_levels([level]))
    # At the root 4 occurrences earn 4 / (4 + 4) = 1/2; below 7 its 3 earn 3 / 7, split 2:1.
    assert scores[(7,)] == pytest.approx(0.5 * 3 / 4)
    assert scores[(7, 8)] == pytest.approx(0.5 * 3 / 4 * (3 / 7) * (2 / 3))
    # The same counts believed more: every score grows.
    trusting = paths(DraftTree.from_levels([rows_level(2, [[7, 8], [7, 8], [7], [9]], 1.0)]))
    assert all(trusting[path] > score for path, score in scores.items())


def test_the_longer_match_speaks_first_and_the_shorter_one_gets_what_is_left() -> None:
    long = Level.from_trie(5, 2, (7,), (-1,), (2,), trust=2.0)
    short = Level.from_trie(2, 10, (7, 9), (-1, -1), (2, 8), trust=2.0)
    by_token = dict(zip(*(lambda t: (t.tokens, t.scores))(DraftTree.from_levels([short, long]))))
    # long: 2 / (2 + 2) = 1/2, all to 7; short: 10 / 12 of the other half, split 2:8.
    assert by_token[7] == pytest.approx(0.5 + 0.5 * (10 / 12) * 0.2)
    assert by_token[9] == pytest.approx(0.5 * (10 / 12) * 0.8)


def test_equal_match_lengths_speak_in_the_order_given() -> None:
    first = rows_level(3, [[5]], trust=1.0)  # takes 1/2 for 5
    second = rows_level(3, [[6]], trust=1.0)  # then 1/2 of the rest for 6
    assert paths(DraftTree.from_levels([first, second])) == pytest.approx({(5,): 0.5, (6,): 0.25})
    assert paths(DraftTree.from_levels([second, first])) == pytest.approx({(6,): 0.5, (5,): 0.25})


def test_a_level_only_speaks_where_it_continues_the_path() -> None:
    # Below 5, only the short level goes on: it gets the whole share there, not what is left.
    long = rows_level(4, [[5], [5]], trust=0.0)  # ends right after 5
    short = rows_level(1, [[5, 6], [8]], trust=0.0)
    scores = paths(DraftTree.from_levels([long, short]))
    assert scores == pytest.approx({(5,): 1.0, (5, 6): 1.0, (8,): 0.0})


def test_identical_paths_of_several_levels_become_one_node() -> None:
    context = rows_level(3, [[5, 6, 7]], trust=1.0)
    served = rows_level(2, [[5, 6], [5, 9]], trust=3.0)
    datastore = trie_level(1, [[5, 6, 7], [4]], trust=16.0)
    tree = DraftTree.from_levels([datastore, served, context])
    assert sorted(tree_paths(tree)) == [(4,), (5,), (5, 6), (5, 6, 7), (5, 9)]
    assert len(set(tree_paths(tree))) == len(tree)


def test_rows_and_tries_of_the_same_counts_score_the_same() -> None:
    continuations = [[1, 2, 3], [1, 2], [1, 4], [2]]
    as_rows = DraftTree.from_levels([rows_level(3, continuations, 2.0)])
    as_trie = DraftTree.from_levels([trie_level(3, continuations, 2.0)])
    assert paths(as_rows) == pytest.approx(paths(as_trie))


def test_out_of_vocabulary_tokens_are_dropped_with_what_follows() -> None:
    level = Level.from_trie(2, 4, (5, 99, 6, 7), (-1, -1, 1, 0), (2, 2, 2, 1), 0.0)
    assert paths(DraftTree.from_levels([level], vocab_size=50)) == pytest.approx(
        {(5,): 0.5, (5, 7): 0.25}
    )
    assert len(DraftTree.from_levels([rows_level(1, [[-3, 1]], 0.0)])) == 0
    assert len(DraftTree.from_levels([])) == 0


def test_the_budget_keeps_the_best_nodes_shallower_first_on_ties() -> None:
    level = rows_level(1, [[5, 6, 7], [5, 6, 7], [8], [8]], trust=0.0)
    full = DraftTree.from_levels([level])
    assert paths(full) == pytest.approx({(5,): 0.5, (5, 6): 0.5, (5, 6, 7): 0.5, (8,): 0.5})
    assert sorted(paths(DraftTree.from_levels([level], budget=2))) == [(5,), (8,)]
    assert sorted(paths(DraftTree.from_levels([level], budget=3))) == [(5,), (5, 6), (8,)]
    assert len(DraftTree.from_levels([level], budget=0)) == 0


# --- chain scoring against a brute-force reference ----------------------------------------------


def reference_scores(levels: list[Level]) -> dict[tuple[int, ...], float]:
    """Chain back-off written the obvious way, path by path, from each level's counts."""
    ordered = sorted(levels, key=lambda level: -level.match_length)  # stable
    counts = [level.counts() for level in ordered]

    def conditional(path):
        prefix, left, p = path[:-1], 1.0, 0.0
        for level, count in zip(ordered, counts):
            n = level.occurrences if not prefix else count.get(prefix, 0.0)
            lists_a_child = any(q[:-1] == prefix and c > 0 for q, c in count.items())
            if not lists_a_child or n <= 0:
                continue
            share = n / (n + level.trust)
            p += left * share * count.get(path, 0.0) / n
            left *= 1.0 - share
        return min(p, 1.0)

    every_path = {path for count in counts for path in count}
    return {
        path: float(np.prod([conditional(path[: i + 1]) for i in range(len(path))]))
        for path in every_path
    }


continuation_lists = st.lists(st.lists(st.integers(0, 3), max_size=4), min_size=1, max_size=6)
levels = st.builds(
    lambda shape, match_length, conts, trust, extra: (
        rows_level(match_length, conts, trust)
        if shape == "rows"
        else trie_level(match_length, [c for c in conts if c] or [[0]], trust, extra)
    ),
    st.sampled_from(["rows", "trie"]),
    st.integers(1, 4),
    continuation_lists,
    st.sampled_from([0.0, 1.0, 3.0, 16.0]),
    st.integers(0, 3),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(levels, max_size=5), st.integers(0, 12))
def test_scoring_and_pruning_match_a_brute_force_reference(level_list, budget) -> None:
    full = DraftTree.from_levels(level_list)
    want = {path: s for path, s in reference_scores(level_list).items()}
    assert paths(full) == pytest.approx(want)
    assert len(set(tree_paths(full))) == len(full)  # one node per path
    for node, parent in enumerate(full.parents):  # parents first, scores never grow down a path
        assert parent < node
        assert parent < 0 or full.scores[node] <= full.scores[parent] + 1e-12
    pruned = DraftTree.from_levels(level_list, budget=budget)
    kept = paths(pruned)
    assert len(kept) == min(budget, len(full))
    for path in kept:  # every kept node's parent is kept: a tree hanging from the root
        assert len(path) == 1 or path[:-1] in kept
    left_out = [s for path, s in want.items() if path not in kept]
    assert all(s >= max(left_out, default=0.0) - 1e-12 for s in kept.values())
    assert paths(full.prune(budget)) == pytest.approx(kept)


# --- the engine's scorer against this reference -------------------------------------------------


wide_levels = st.builds(
    lambda shape, match_length, conts, trust, extra: (
        rows_level(match_length, conts, trust)
        if shape == "rows"
        else trie_level(match_length, [c for c in conts if c] or [[0]], trust, extra)
    ),
    st.sampled_from(["rows", "trie"]),
    st.integers(1, 6),
    st.lists(st.lists(st.integers(-1, 7), max_size=6), min_size=1, max_size=8),
    st.sampled_from([0.0, 0.5, 1.0, 3.0, 16.0]),
    st.integers(0, 3),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(wide_levels, max_size=10), st.one_of(st.none(), st.integers(0, 20)),
       st.one_of(st.none(), st.integers(1, 8)))
def test_the_engine_scores_exactly_as_the_reference(level_list, budget, vocab_size) -> None:
    from decoder.draft_sources import score_in_engine

    reference = DraftTree.from_levels(level_list, budget=budget, vocab_size=vocab_size)
    engine = score_in_engine(level_list, budget, vocab_size)
    assert_same_tree(engine, reference)
    full = DraftTree.from_levels(level_list, vocab_size=vocab_size)
    full_engine = score_in_engine(level_list, None, vocab_size)
    assert (full_engine.tokens, full_engine.parents) == (full.tokens, full.parents)


def test_the_engine_refuses_what_the_reference_refuses() -> None:
    from decoder.draft_sources import score_in_engine

    bad = Level.from_trie(2, 2, (1, 2), (1, -1), (1, 1), 0.0)
    with pytest.raises(ValueError, match="earlier node"):
        score_in_engine([bad])
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree.from_levels([bad])


# --- pruning and layout ------------------------------------------------------------------------


def test_prune_keeps_the_best_nodes_and_breaks_ties_by_depth_then_order() -> None:
    # root -> 5 (0.9) -> 6 (0.5) -> 7 (0.5); root -> 8 (0.5); root -> 9 (0.1)
    tree = DraftTree([5, 6, 7, 8, 9], [-1, 0, 1, -1, -1], [0.9, 0.5, 0.5, 0.5, 0.1])
    assert tree.ranking() == [0, 3, 1, 2, 4]  # 0.5 each: 8 (depth 1), 6 (2), 7 (3)
    assert paths(tree.prune(3)) == {(5,): 0.9, (5, 6): 0.5, (8,): 0.5}
    assert tree.prune(0).tokens == []
    assert tree.prune(10) is tree
    assert tree.ranked_scores() == [0.9, 0.5, 0.5, 0.5, 0.1]


def test_linearise_builds_the_tree_mask_positions_and_children() -> None:
    # root -> 5 -> 6, root -> 7; prefix of 3 tokens already in the cache
    tree = DraftTree([5, 6, 7], [-1, 0, -1], [0.9, 0.8, 0.3])
    inputs = tree.linearise(4, 3, torch.float32, "cpu")
    assert inputs.input_ids.tolist() == [[4, 5, 6, 7]]
    assert inputs.position_ids.tolist() == [[3, 4, 5, 4]]
    assert inputs.cache_position.tolist() == [3, 4, 5, 6]
    assert inputs.children == ({5: 1, 7: 3}, {6: 2}, {}, {})
    mask = inputs.attention_mask
    assert mask.shape == (1, 1, 4, 7) and mask.dtype == torch.float32
    visible = (mask[0, 0] == 0).int().tolist()
    assert visible == [
        [1, 1, 1, 1, 0, 0, 0],  # root: the prefix and itself
        [1, 1, 1, 1, 1, 0, 0],  # 5: root, itself
        [1, 1, 1, 1, 1, 1, 0],  # 6: root, 5, itself
        [1, 1, 1, 1, 0, 0, 1],  # 7: root, itself; not its cousins
    ]
    assert mask[0, 0, 3, 4].item() == torch.finfo(torch.float32).min


def test_linearise_uses_the_model_dtype() -> None:
    inputs = DraftTree.empty().linearise(4, 2, torch.bfloat16, "cpu")
    assert inputs.attention_mask.dtype == torch.bfloat16
    assert inputs.attention_mask.tolist() == [[[[0.0, 0.0, 0.0]]]]
    assert len(inputs) == 1
