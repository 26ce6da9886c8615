"""decoder/draft_tree.py: merging, pruning and linearising draft trees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from decoder.draft_tree import Draft, DraftTree, count_trie


def paths(tree: DraftTree) -> dict[tuple[int, ...], float]:
    return dict(zip(draft_paths(tree), tree.scores))


def test_count_trie_counts_the_sequences_through_each_node() -> None:
    assert count_trie([[5, 6], [5, 7], [8]]) == ([5, 6, 7, 8], [-1, 0, 0, -1], [2, 1, 1, 1])
    assert count_trie([]) == ([], [], [])


def test_draft_rejects_malformed_trees() -> None:
    with pytest.raises(ValueError, match="parent"):
        Draft((1, 2), (-1, 1), (0.5, 0.5))  # a node cannot be its own parent
    with pytest.raises(ValueError, match="as many"):
        Draft((1, 2), (-1,), (0.5, 0.5))


def test_identical_paths_merge_and_their_scores_combine() -> None:
    a = Draft((5, 6, 7), (-1, 0, 0), (0.5, 0.4, 0.1))
    b = Draft((5, 6, 9), (-1, 0, -1), (0.5, 0.2, 0.3))
    union = DraftTree.merge([a, b])
    assert paths(union) == pytest.approx(
        {(5,): 0.75, (5, 6): 1 - 0.6 * 0.8, (5, 7): 0.1, (9,): 0.3}
    )
    assert paths(DraftTree.merge([a, b], rule="max")) == pytest.approx(
        {(5,): 0.5, (5, 6): 0.4, (5, 7): 0.1, (9,): 0.3}
    )


def test_scores_are_made_non_increasing_along_paths() -> None:
    # A source may score a child above its parent; the merged tree never does.
    tree = DraftTree.merge([Draft((5, 6, 7), (-1, 0, 1), (0.2, 0.9, 1.7))])
    assert tree.scores == [0.2, 0.2, 0.2]


def test_out_of_vocabulary_tokens_are_dropped_with_their_subtrees() -> None:
    draft = Draft((5, 99, 6, 7), (-1, -1, 1, 0), (0.5, 0.5, 0.5, 0.5))
    assert paths(DraftTree.merge([draft], vocab_size=50)) == {(5,): 0.5, (5, 7): 0.5}


def test_prune_keeps_the_best_nodes_and_breaks_ties_by_depth_then_order() -> None:
    # root -> 5 (0.9) -> 6 (0.5) -> 7 (0.5); root -> 8 (0.5); root -> 9 (0.1)
    tree = DraftTree([5, 6, 7, 8, 9], [-1, 0, 1, -1, -1], [0.9, 0.5, 0.5, 0.5, 0.1])
    assert tree.ranking() == [0, 3, 1, 2, 4]  # 0.5 each: 8 (depth 1), 6 (2), 7 (3)
    assert paths(tree.prune(3)) == {(5,): 0.9, (5, 6): 0.5, (8,): 0.5}
    assert tree.prune(0).tokens == []
    assert tree.prune(10) is tree
    assert tree.ranked_scores() == [0.9, 0.5, 0.5, 0.5, 0.1]


drafts = st.integers(0, 12).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 4), min_size=n, max_size=n),
        st.tuples(*[st.integers(-1, i - 1) for i in range(n)]),
        st.lists(st.floats(0, 1), min_size=n, max_size=n),
    )
).map(lambda t: Draft(tuple(t[0]), tuple(t[1]), tuple(t[2])))


@given(st.lists(drafts, max_size=3), st.integers(0, 20))
def test_pruning_keeps_a_tree_of_the_best_scored_paths(sources, budget) -> None:
    merged = DraftTree.merge(sources)
    pruned = merged.prune(budget)
    assert len(pruned) == min(budget, len(merged))
    kept = paths(pruned)
    for path in kept:  # every kept node's parent is kept: a tree hanging from the root
        assert len(path) == 1 or path[:-1] in kept
    # Nothing left out scores better than something kept.
    everything = paths(merged)
    left_out = [score for path, score in everything.items() if path not in kept]
    assert all(s >= max(left_out, default=0.0) for s in kept.values())
    # Brute force: each distinct path once, the union of its scores, capped by its prefixes'.
    union: dict[tuple[int, ...], float] = {}
    for draft in sources:
        for path, score in zip(draft_paths(draft), draft.scores):
            union[path] = 1 - (1 - union.get(path, 0.0)) * (1 - score)
    want = {path: min(union[path[:i]] for i in range(1, len(path) + 1)) for path in union}
    assert everything == pytest.approx(want)


def draft_paths(draft: Draft) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for token, parent in zip(draft.tokens, draft.parents):
        out.append((out[parent] if parent >= 0 else ()) + (token,))
    return out


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
