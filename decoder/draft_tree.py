"""Draft trees: merging proposals, pruning them to a budget, laying them out for one forward pass.

A tree is stored as parallel lists in which parents come before their children: node ``i`` holds
``tokens[i]``, ``parents[i]`` (-1: a child of the root) and ``scores[i]``, the estimated
probability that the model produces the whole path from the root to node ``i``. Such a score can
only shrink along a path, which is what lets pruning by score keep every kept node's parent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Draft:
    """One source's proposal: a scored trie of continuations after the root."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not len(self.tokens) == len(self.parents) == len(self.scores):
            raise ValueError("a Draft needs as many parents and scores as tokens")
        for i, parent in enumerate(self.parents):
            if not -1 <= parent < i:
                raise ValueError(f"node {i}: parent {parent} must be -1 or an earlier node")

    def __len__(self) -> int:
        return len(self.tokens)


EMPTY_DRAFT = Draft()


def count_trie(sequences: Iterable[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """The trie of ``sequences`` as (tokens, parents, counts): counts[i] = sequences through node i.

    Nodes are numbered in first-seen order, so parents precede children.
    """
    tokens: list[int] = []
    parents: list[int] = []
    counts: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for seq in sequences:
        parent = -1
        for token in seq:
            key = (parent, int(token))
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(int(token))
                parents.append(parent)
                counts.append(0)
            counts[node] += 1
            parent = node
    return tokens, parents, counts


@dataclass(frozen=True)
class TreeInputs:
    """A draft tree laid out for the model: the root first, then the draft nodes, parents first.

    Tree index 0 is the root, tree index ``i + 1`` is draft node ``i``.
    """

    input_ids: torch.Tensor  # [1, n + 1]
    position_ids: torch.Tensor  # [1, n + 1]: prefix length + depth
    cache_position: torch.Tensor  # [n + 1]: where the new keys land in the cache
    attention_mask: torch.Tensor  # [1, 1, n + 1, prefix + n + 1]: 0 visible, dtype-min masked
    children: tuple[dict[int, int], ...]  # tree index -> {token: child's tree index}

    def __len__(self) -> int:
        return self.input_ids.shape[1]


class DraftTree:
    """The draft nodes of one step, merged from every source.

    Identical paths from several sources become one node whose score combines theirs; scores are
    then made non-increasing along every path (a child is never likelier than its parent).
    """

    def __init__(self, tokens: list[int], parents: list[int], scores: list[float]) -> None:
        self.tokens = tokens
        self.parents = parents
        self.scores = scores

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> DraftTree:
        """No draft nodes: the step verifies the root alone (a plain decoding step)."""
        return cls([], [], [])

    @classmethod
    def merge(
        cls, drafts: Iterable[Draft], *, vocab_size: int | None = None, rule: str = "union"
    ) -> DraftTree:
        """One tree from several drafts; tokens outside ``0..vocab_size-1`` are dropped with
        their subtrees (a datastore of another tokenizer must not crash the embedding)."""
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        index: dict[tuple[int, int], int] = {}
        for draft in drafts:
            merged_of: list[int | None] = []  # the draft's node -> its merged node, None if dropped
            for token, parent, score in zip(draft.tokens, draft.parents, draft.scores):
                merged_parent = -1 if parent < 0 else merged_of[parent]
                if merged_parent is None or (
                    vocab_size is not None and not 0 <= token < vocab_size
                ):
                    merged_of.append(None)
                    continue
                score = min(max(float(score), 0.0), 1.0)
                key = (merged_parent, token)
                node = index.get(key)
                if node is None:
                    node = index[key] = len(tokens)
                    tokens.append(token)
                    parents.append(merged_parent)
                    scores.append(score)
                elif rule == "union":
                    scores[node] = 1.0 - (1.0 - scores[node]) * (1.0 - score)
                else:
                    scores[node] = max(scores[node], score)
                merged_of.append(node)
        for node, parent in enumerate(parents):  # parents first: one pass suffices
            if parent >= 0 and scores[node] > scores[parent]:
                scores[node] = scores[parent]
        return cls(tokens, parents, scores)

    def ranking(self) -> list[int]:
        """Nodes best first: by score, then shallower, then earlier; a parent always ranks before
        its children (its score is at least theirs, and it is shallower)."""
        depth = self.depths()
        return sorted(range(len(self)), key=lambda i: (-self.scores[i], depth[i], i))

    def ranked_scores(self) -> list[float]:
        """Scores best first: the sum of the first n is the expected number of accepted nodes
        when the n best are verified (the scores estimate path probabilities)."""
        return sorted(self.scores, reverse=True)

    def depths(self) -> list[int]:
        """Depth of each node: 1 for a child of the root."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return depth

    def prune(self, budget: int) -> DraftTree:
        """The ``budget`` best nodes, which form a tree hanging from the root."""
        if budget >= len(self):
            return self
        kept = sorted(self.ranking()[:budget])  # original order keeps parents first
        new_index = {old: new for new, old in enumerate(kept)}
        parents = [-1 if self.parents[i] < 0 else new_index[self.parents[i]] for i in kept]
        return DraftTree(
            [self.tokens[i] for i in kept], parents, [self.scores[i] for i in kept]
        )

    def linearise(
        self, root: int, prefix_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> TreeInputs:
        """The root and the draft nodes as model inputs, with tree attention.

        Every node sees the whole prefix (the tokens already in the KV cache), its ancestors and
        itself; siblings and cousins stay invisible. The mask is additive and in the model's dtype:
        a boolean mask would be added as 0/1 by eager attention, silently wrong.
        """
        n = len(self) + 1
        tree_parents = np.array([-1] + [p + 1 for p in self.parents], dtype=np.int64)
        visible = np.eye(n, dtype=bool)  # visible[i, j]: tree node i attends to tree node j
        for node in range(1, n):
            visible[node] |= visible[tree_parents[node]]
        depth = visible.sum(axis=1) - 1  # ancestors-or-self minus one: the root has depth 0

        # Built where the model runs: only the small [n, n] pattern crosses over.
        mask = torch.zeros((n, prefix_len + n), dtype=dtype, device=device)  # [n, prefix + n]
        hidden = torch.from_numpy(~visible).to(device)  # [n, n]
        mask[:, prefix_len:].masked_fill_(hidden, torch.finfo(dtype).min)

        children: list[dict[int, int]] = [{} for _ in range(n)]
        for i, token in enumerate(self.tokens):
            children[tree_parents[i + 1]][token] = i + 1
        return TreeInputs(
            input_ids=torch.tensor([[root, *self.tokens]], device=device),
            position_ids=torch.from_numpy(prefix_len + depth).unsqueeze(0).to(device),
            cache_position=torch.arange(prefix_len, prefix_len + n, device=device),
            attention_mask=mask[None, None],
            children=tuple(children),
        )
