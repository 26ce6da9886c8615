"""Draft trees: the sources' levels scored into one tree, pruned to a budget, laid out for one
forward pass.

A tree is stored as parallel lists in which parents come before their children: node ``i`` holds
``tokens[i]``, ``parents[i]`` (-1: a child of the root) and ``scores[i]``, the estimated
probability that the model produces the whole path from the root to node ``i``. Such a score can
only shrink along a path, which is what lets pruning by score keep every kept node's parent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import lt

import numpy as np
import torch

PAD = -1  # a row of continuation tokens ends at its first negative token


@dataclass(frozen=True, eq=False)
class Level:
    """One source's counted continuations of one matched suffix of the context.

    ``match_length``: the suffix's length in tokens. ``occurrences``: how many times it occurs
    with at least one token after it. ``count(path)``: how many of those occurrences continue
    with ``path`` (tokens after the root). ``trust``: how many occurrences the scorer wants
    before it half believes the level (``DraftTree.from_levels``): small for a source that is
    usually right when it matches, large for a noisy one.

    The counts come in one of two shapes, left as they are until the scorer merges a step's
    levels all at once. ``rows: [n, depth]``: one continuation per occurrence, a row ending at
    its first negative token; ``count(path)`` is the number of rows starting with ``path`` (the
    n-gram sources). ``trie``: ``(tokens, parents, counts)``, parents before children, -1 for a
    child of the root, ``counts[i]`` occurrences continuing with node ``i``'s path (the
    datastore); its parents are checked when it is merged.
    """

    match_length: int
    occurrences: int
    trust: float
    rows: np.ndarray | None = None  # [n, depth] int64
    trie: tuple[Sequence[int], Sequence[int], Sequence[float]] | None = None

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.trie is None):
            raise ValueError("a Level holds either rows or a trie")
        if self.rows is not None and self.rows.ndim != 2:
            raise ValueError(f"a Level's rows must be [n, depth], got shape {self.rows.shape}")
        if self.trie is not None and not len(self.trie[0]) == len(self.trie[1]) == len(
            self.trie[2]
        ):
            raise ValueError("a Level's trie needs as many parents and counts as tokens")
        if self.trust < 0 or self.occurrences < 0:
            raise ValueError("a Level's trust and occurrences must be >= 0")

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.trie[0])

    @classmethod
    def from_continuations(
        cls,
        match_length: int,
        continuations: Sequence[Sequence[int]],
        trust: float,
    ) -> Level:
        """One continuation per occurrence of the suffix (of any lengths)."""
        depth = max((len(c) for c in continuations), default=0)
        rows = np.full((len(continuations), depth), PAD, dtype=np.int64)
        for r, continuation in enumerate(continuations):
            rows[r, : len(continuation)] = continuation
        return cls(match_length, len(rows), trust, rows=rows)

    @classmethod
    def from_trie(
        cls,
        match_length: int,
        occurrences: int,
        tokens: Sequence[int],
        parents: Sequence[int],
        counts: Sequence[float],
        trust: float,
    ) -> Level:
        """A counted trie, as the datastore answers (``rest.types.SearchResult``)."""
        return cls(match_length, occurrences, trust, trie=(tokens, parents, counts))

    def counts(self) -> dict[tuple[int, ...], float]:
        """Every path with its count (a readable view for tests and debugging)."""
        out: dict[tuple[int, ...], float] = {}
        if self.trie is not None:
            paths: list[tuple[int, ...]] = []
            for token, parent, count in zip(*self.trie):
                paths.append((paths[parent] if parent >= 0 else ()) + (int(token),))
                out[paths[-1]] = float(count)
            return out
        for row in self.rows.tolist():
            for d in range(len(row)):
                if row[d] < 0:
                    break
                path = tuple(row[: d + 1])
                out[path] = out.get(path, 0.0) + 1.0
        return out


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
    """The draft nodes of one step, scored.

    ``from_levels`` builds it from the sources' levels; ``prune`` keeps the best nodes. The
    verifier needs only ``tokens`` and ``parents``; the scores serve the budget.
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
    def from_levels(
        cls,
        levels: Iterable[Level],
        *,
        budget: int | None = None,
        vocab_size: int | None = None,
    ) -> DraftTree:
        """Every level's paths in one trie (identical paths once), scored by chain back-off, and
        the ``budget`` best nodes kept (all when None).

        score(node) = score(parent) x P(node's token | context + parent's path), where the
        conditional interpolates the levels that continue the parent (Witten-Bell style): at a
        parent, the levels listing a child there are taken longest match first (ties: in the
        order given); one in which the parent's path follows the suffix ``n`` times takes the
        share ``n / (n + trust)`` of what longer levels left and hands it to the children by
        count / n. What no level takes is the chance of a token none of them proposed. The
        conditional is at most 1, so scores never grow along a path.

        Tokens outside ``0..vocab_size-1`` (without a vocabulary: ``0..2^31-1``) are dropped with
        what follows them (a datastore of another tokenizer must not crash the embedding).
        """
        levels = [level for level in levels
                  if len(level) and (level.rows is None or level.rows.shape[1])]  # fmt: skip
        if not levels:
            return cls.empty()
        order = sorted(range(len(levels)), key=lambda i: -levels[i].match_length)  # stable
        levels = [levels[i] for i in order]
        tokens, parents, counts = _merged_trie(levels, vocab_size)
        scores, depth = _chain_scores(levels, parents, counts)
        tokens, parents = tokens.tolist(), parents.tolist()
        if budget is None or budget >= len(tokens):
            return cls(tokens, parents, scores)
        ranking = _best_first(np.array(scores), np.array(depth))
        return _subtree(tokens, parents, scores, np.sort(ranking[:budget]).tolist())

    def ranking(self) -> list[int]:
        """Nodes best first: by score, then shallower, then earlier; a parent always ranks before
        its children (its score is at least theirs, and it is shallower)."""
        ranking = _best_first(np.array(self.scores, dtype=np.float64), np.array(self.depths()))
        return ranking.tolist()

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
        return _subtree(self.tokens, self.parents, self.scores, sorted(self.ranking()[:budget]))

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


def _best_first(scores: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Node numbers by score (best first), then depth (shallower first), then number."""
    return np.lexsort((np.arange(len(scores)), depth, -scores))


def _subtree(
    tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float], kept: Sequence[int]
) -> DraftTree:
    """The ``kept`` nodes (ascending, each one's parent kept too) as a tree of their own."""
    new_number = {old: new for new, old in enumerate(kept)}
    return DraftTree(
        [tokens[i] for i in kept],
        [new_number[parents[i]] if parents[i] >= 0 else -1 for i in kept],
        [scores[i] for i in kept],
    )


def _merged_trie(
    levels: Sequence[Level], vocab_size: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, parents, counts): the trie of every level's paths, identical paths once,
    numbered as first met (levels in the order given): parents before children. ``counts:
    [n_nodes, n_levels]`` holds each level's count of each node's path.

    Plain Python over the few hundred nodes of a step, whose numpy calls would cost more than
    their work (a vectorised version measured about twice as slow). A node is known by its key,
    ``(parent + 1) << shift | token``, numbered in the order the keys enter ``index``.
    """
    limit = min(vocab_size, 1 << 31) if vocab_size is not None else 1 << 31
    shift = max(limit - 1, 1).bit_length()
    n_levels = len(levels)
    index: dict[int, int] = {}
    cells: list[int] = []  # one per count: node * n_levels + level (negative: dropped)
    weights: list[float] = []  # the counts
    for number, level in enumerate(levels):  # lookups written out: calls would double the loops
        if level.trie is not None:
            trie_tokens, trie_parents, trie_counts = level.trie
            n = len(trie_tokens)
            if n and (min(trie_parents) < -1 or not all(map(lt, trie_parents, range(n)))):
                raise ValueError("a Level's trie has a parent that is not -1 or an earlier node")
            merged = [0] * n + [-1]  # the level's node -> merged node; merged[-1]: the root
            in_vocabulary = n and min(trie_tokens) >= 0 and max(trie_tokens) < limit
            for i, token, parent in zip(range(n), trie_tokens, trie_parents):
                above = merged[parent]
                if not in_vocabulary and (above == -2 or not 0 <= token < limit):
                    merged[i] = -2  # out of the vocabulary, or below such a token
                    continue
                key = (above + 1) << shift | token
                found = index.get(key)
                if found is None:
                    found = index[key] = len(index)
                merged[i] = found
            cells.extend([node * n_levels + number for node in merged[:n]])
            weights.extend(trie_counts)
        else:
            before = len(cells)
            for row in level.rows.tolist():
                above = -1
                for token in row:
                    if not 0 <= token < limit:
                        break
                    key = (above + 1) << shift | token
                    found = index.get(key)
                    if found is None:
                        found = index[key] = len(index)
                    cells.append(found * n_levels + number)
                    above = found
            weights.extend([1.0] * (len(cells) - before))

    keys = np.fromiter(index, np.int64, len(index))
    tokens, parents = keys & ((1 << shift) - 1), (keys >> shift) - 1
    cell = np.fromiter(cells, np.int64, len(cells))
    weight = np.fromiter(weights, np.float64, len(cells))
    if len(cells) and min(cells) < 0:
        cell, weight = cell[cell >= 0], weight[cell >= 0]
    counts = np.bincount(cell, weights=weight, minlength=len(keys) * n_levels)
    return tokens, parents, counts.reshape(len(keys), n_levels)


def _chain_scores(
    levels: Sequence[Level], parents: np.ndarray, counts: np.ndarray
) -> tuple[list[float], list[int]]:
    """(scores, depth) of each node by chain back-off over ``levels`` (longest match first), as
    ``DraftTree.from_levels`` defines it. Nodes come parents first."""
    n_nodes, n_levels = counts.shape
    # n[p, l]: how often level l's suffix is followed by parent p's path (row 0: the root)
    n = np.empty((n_nodes + 1, n_levels))
    n[0] = [level.occurrences for level in levels]
    n[1:] = counts
    trust = np.array([level.trust for level in levels])
    above = parents + 1  # [n_nodes]: each node's parent's row in n
    at_parent = above[:, None] * n_levels + np.arange(n_levels)  # [n_nodes, n_levels]
    lists_a_child = np.bincount(at_parent[counts > 0], minlength=n.size).reshape(n.shape) > 0
    active = lists_a_child & (n > 0)
    share = np.divide(n, n + trust, out=np.zeros_like(n), where=active)
    left_before = np.ones_like(n)  # what the longer levels left, level by level
    np.cumprod(1.0 - share[:, :-1], axis=1, out=left_before[:, 1:])
    per_count = np.divide(left_before * share, n, out=np.zeros_like(n), where=active)
    conditional = np.minimum((per_count[above] * counts).sum(axis=1), 1.0)

    scores = conditional.tolist()  # times the parent's score, parents first
    depth = [1] * n_nodes
    for i, parent in enumerate(parents.tolist()):
        if parent >= 0:
            scores[i] *= scores[parent]
            depth[i] = depth[parent] + 1
    return scores, depth
