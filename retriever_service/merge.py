"""Merging the answers of servers that hold different shards of one datastore.

Each server answers for its own shards: its match length is the longest suffix found there, its
tree is pruned to the budget by its own counts. The merge rebuilds what one server holding every
shard would answer:

- match length: the longest of the answers; answers with a shorter match do not contain that
  suffix at all and are dropped, as the single server would not count them.
- occurrences: summed over the answers kept.
- tree: identical root-to-node paths are one node whose count is the sum of the answers' counts,
  then the tree is pruned again to ``budget`` nodes best-first by count, with the exact policy's
  tie-breaks (shallower first, then the earlier-added parent, then the smaller token id).

The match length and occurrences are exact. The tree is exact whenever no server had to prune
(trees smaller than the budget); otherwise a path that fell below the cut on every server but is
frequent in sum can be missing, and a kept node's count can be low by the occurrences a server
pruned. Drafts are verified, so this costs at most some accepted tokens, never correctness.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from rest.types import EMPTY_RESULT, SearchResult

Path = tuple[int, ...]


def merge_results(results: Sequence[SearchResult], budget: int) -> SearchResult:
    """One continuation tree from the answers of several shards (see the module docstring)."""
    if not results:
        return EMPTY_RESULT
    longest = max(r.match_length for r in results)
    if longest == 0:
        return EMPTY_RESULT
    kept = [r for r in results if r.match_length == longest]
    shard = ",".join(r.shard for r in kept if r.shard)
    occurrences = sum(r.occurrences for r in kept)
    if len(kept) == 1 and len(kept[0]) <= budget:  # nothing to add up or cut: keep its order
        only = kept[0]
        return SearchResult(longest, occurrences, only.tokens, only.parents, only.counts, shard)
    counts, children = summed_paths(kept)
    tokens, parents, node_counts = prune_best_first(counts, children, budget)
    return SearchResult(longest, occurrences, tokens, parents, node_counts, shard)


def summed_paths(results: Sequence[SearchResult]) -> tuple[dict[Path, int], dict[Path, list[Path]]]:
    """Count per root-to-node path, summed over ``results``, and each path's child paths."""
    counts: dict[Path, int] = {}
    children: dict[Path, list[Path]] = {}
    for result in results:
        for path, count in zip(result.paths(), result.counts):
            if path not in counts:
                counts[path] = 0
                children.setdefault(path[:-1], []).append(path)
            counts[path] += count
    return counts, children


def prune_best_first(
    counts: dict[Path, int], children: dict[Path, list[Path]], budget: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """At most ``budget`` nodes, most frequent first; a node is only reachable after its parent.

    A child never counts more than its parent, so taking the frontier's best node each time is the
    same as sorting all nodes by count with parents first.
    """
    tokens: list[int] = []
    parents: list[int] = []
    node_counts: list[int] = []
    # heap entries: (-count, depth, parent index, token, path)
    frontier = [(-counts[p], 1, -1, p[-1], p) for p in children.get((), [])]
    heapq.heapify(frontier)
    while frontier and len(tokens) < budget:
        neg_count, depth, parent, token, path = heapq.heappop(frontier)
        index = len(tokens)
        tokens.append(token)
        parents.append(parent)
        node_counts.append(-neg_count)
        for child in children.get(path, []):
            heapq.heappush(frontier, (-counts[child], depth + 1, index, child[-1], child))
    return tuple(tokens), tuple(parents), tuple(node_counts)
