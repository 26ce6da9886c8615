"""Merging the answers of servers that hold different shards of one datastore.

Each server answers for its own shards: its match length is the longest suffix found there, its
tree is pruned to the budget by its own counts, and its ``cut_count`` says the largest count it
left out. The merge rebuilds what one server holding every shard would answer:

- match length: the longest of the answers; answers with a shorter match do not contain that
  suffix at all and are dropped, as the single server would not count them. Exact.
- occurrences: summed over the answers kept. Exact.
- tree: identical root-to-node paths are one node whose count is the sum of the answers' counts,
  pruned again to ``budget`` nodes best-first by count, with the exact policy's tie-breaks
  (shallower first, then the earlier-added parent, then the smaller token id).
- back-off levels (``merge_levels``): level by level, by match length. A server whose longest
  match is ``m`` answers lengths ``m, m - 1, ...``; the merged levels are ``M, M - 1, ...`` for
  the longest match ``M`` of all, and a server contributes to exactly the lengths ``<= m`` (it
  has no occurrence of a longer suffix), which its answer covers: no level loses a server.

The tree is exact whenever no server had to prune (every ``cut_count`` is 0). When one did, a
path it left out may count there up to its ``cut_count``, so the merge knows each node's count
only within bounds (``MergedTree``): at least the sum of the answers that have the path, at most
that plus the ``cut_count`` of every answer that does not. The merge ranks nodes by the lower
bound, so a node's count is never more than the truth, and:

- the merged answer's ``cut_count`` is an upper bound on the true count of every node it left
  out (seen and pruned, or seen nowhere: at most the sum of the ``cut_count``s); merges of
  merges keep the guarantee;
- ``MergedTree.exact`` certifies the cases where the merged tree is exactly the whole
  datastore's: every kept node's count is exact, and every node left out is bounded below the
  smallest kept count. Where it is not certified, the tree is a valid one with the exact match,
  occurrences and counts no higher than the truth, and may differ at the margin (a path that fell
  below the cut on several servers but is frequent in sum). Drafts are verified, so this costs at
  most some accepted tokens, never correctness.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from rest.types import EMPTY_RESULT, SearchResult

Path = tuple[int, ...]


@dataclass(frozen=True)
class MergedTree:
    """A merge with its bounds: ``upper[i]`` bounds node ``i``'s true count from above (its count
    in ``result`` bounds it from below); ``exact`` certifies that ``result`` is what one server
    holding every shard would answer."""

    result: SearchResult
    upper: tuple[int, ...]
    exact: bool


def merge_results(results: Sequence[SearchResult], budget: int) -> SearchResult:
    """One continuation tree from the answers of several shards (see the module docstring)."""
    return merge_with_bounds(results, budget).result


def merge_with_bounds(results: Sequence[SearchResult], budget: int) -> MergedTree:
    if not results:
        return MergedTree(EMPTY_RESULT, (), True)
    longest = max(r.match_length for r in results)
    covered = _searched_shards(results)
    if longest == 0:
        return MergedTree(_with_shards(EMPTY_RESULT, "", covered), (), True)
    kept = [r for r in results if r.match_length == longest]
    shard = ",".join(r.shard for r in kept if r.shard)
    occurrences = sum(r.occurrences for r in kept)
    if len(kept) == 1 and len(kept[0]) <= budget:
        # Only one answer has the longest match, so it holds every occurrence of that suffix:
        # its tree is the whole datastore's (searched with the same budget), order included.
        only = kept[0]
        result = SearchResult(longest, occurrences, only.tokens, only.parents, only.counts, shard,
                              only.cut_count, covered)
        return MergedTree(result, only.counts, True)
    counts, children, present = summed_paths(kept)
    cuts = [r.cut_count for r in kept]
    total_cut = sum(cuts)
    # What the answers that lack a path may hold of it: their cut counts.
    missing = {path: total_cut - sum(cuts[i] for i in holders)
               for path, holders in present.items()} if total_cut else None
    tokens, parents, node_counts, paths, pruned = prune_best_first(counts, children, budget)
    if missing is None:
        upper = node_counts
        left_out = max((counts[p] for p in pruned), default=0)
        exact = True
    else:
        upper = tuple(c + missing[p] for c, p in zip(node_counts, paths))
        left_out = max([total_cut] + [counts[p] + missing[p] for p in pruned])
        smallest = min(node_counts, default=0)
        exact = all(missing[p] == 0 for p in paths) and (
            len(paths) == budget
            and all(counts[p] + missing[p] < smallest for p in pruned if missing[p])
            and total_cut < smallest
        )
    result = SearchResult(longest, occurrences, tokens, parents, node_counts, shard, left_out,
                          covered)
    return MergedTree(result, tuple(upper), exact)


def merge_levels(answers: Sequence[Sequence[SearchResult]], budget: int,
                 levels: int) -> list[SearchResult]:
    """Back-off levels (``RetrievalSession.search_levels``) from several shards' levels: the
    merged level of each match length, longest first, at most ``levels`` of them."""
    by_length: dict[int, list[SearchResult]] = {}
    for answer in answers:
        for level in answer:
            by_length.setdefault(level.match_length, []).append(level)
    if not by_length:
        return []
    longest = max(by_length)
    return [merge_results(by_length[length], budget)
            for length in range(longest, max(0, longest - levels), -1)
            if length in by_length]


def summed_paths(
    results: Sequence[SearchResult],
) -> tuple[dict[Path, int], dict[Path, list[Path]], dict[Path, list[int]]]:
    """Count per root-to-node path summed over ``results``, each path's child paths, and which
    results hold each path (by index)."""
    counts: dict[Path, int] = {}
    children: dict[Path, list[Path]] = {}
    present: dict[Path, list[int]] = {}
    for number, result in enumerate(results):
        for path, count in zip(result.paths(), result.counts):
            if path not in counts:
                counts[path] = 0
                present[path] = []
                children.setdefault(path[:-1], []).append(path)
            counts[path] += count
            present[path].append(number)
    return counts, children, present


def prune_best_first(counts: dict[Path, int], children: dict[Path, list[Path]], budget: int):
    """At most ``budget`` nodes, most frequent first; a node is only reachable after its parent.

    A child never counts more than its parent, so taking the frontier's best node each time is the
    same as sorting all nodes by count with parents first. Returns tokens, parents, counts, the
    kept paths, and the frontier paths left out.
    """
    tokens: list[int] = []
    parents: list[int] = []
    node_counts: list[int] = []
    paths: list[Path] = []
    # heap entries: (-count, depth, parent index, token, path)
    frontier = [(-counts[p], 1, -1, p[-1], p) for p in children.get((), [])]
    heapq.heapify(frontier)
    while frontier and len(tokens) < budget:
        neg_count, depth, parent, token, path = heapq.heappop(frontier)
        index = len(tokens)
        tokens.append(token)
        parents.append(parent)
        node_counts.append(-neg_count)
        paths.append(path)
        for child in children.get(path, []):
            heapq.heappush(frontier, (-counts[child], depth + 1, index, child[-1], child))
    pruned = [entry[-1] for entry in frontier]
    return tuple(tokens), tuple(parents), tuple(node_counts), paths, pruned


def _searched_shards(results: Sequence[SearchResult]) -> tuple[str, ...]:
    """Every shard the answers say they cover, once, in their order."""
    return tuple(dict.fromkeys(s for r in results for s in r.searched_shards))


def _with_shards(result: SearchResult, shard: str, covered: tuple[str, ...]) -> SearchResult:
    return SearchResult(result.match_length, result.occurrences, result.tokens, result.parents,
                        result.counts, shard, result.cut_count, covered)
