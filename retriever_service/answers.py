"""Every answer a server sends is checked where it enters the client.

A server with a bug, a corrupt shard or a man in the middle must not make the decoder fail: an
answer that breaks any rule below is refused as "no draft" (``InvalidAnswer``, counted by the
client), never passed on and never raised to the decoder. The rules are what the engine
guarantees (``rest.types.SearchResult``, ``proto/rest/retriever/v1/retriever.proto``):

- ``tokens``, ``parents`` and ``counts`` have one entry per node, at most ``budget`` nodes;
- no match (``match_length == 0``) means an empty tree; a match is ``min_span..max_span``
  tokens long, no longer than the context sent, and occurs at least once;
- every token is in the vocabulary, every parent an earlier node (or -1), no node deeper than
  ``max_depth``, no token twice under one parent;
- counts add up: every count is at least 1, and the counts of a node's children (of the root
  level: the occurrences) sum to at most that node's count, since each occurrence of a path is
  followed by at most one next token;
- ``cut_count`` (the largest count the budget left out) is at most the occurrences.

Checking a 64-node tree costs about 15 µs in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

from rest.types import SearchParams, SearchResult


class InvalidAnswer(ValueError):
    """A server's answer that breaks the contract; the search is "no draft"."""


def check_result(
    result: SearchResult, params: SearchParams, context_tokens: int, vocab_size: int
) -> None:
    """Raise ``InvalidAnswer`` naming the first rule ``result`` breaks."""
    tokens, parents, counts = result.tokens, result.parents, result.counts
    n = len(tokens)
    if len(parents) != n or len(counts) != n:
        raise InvalidAnswer(
            f"{n} tokens, {len(parents)} parents and {len(counts)} counts: one of each per node"
        )
    if n > params.budget:
        raise InvalidAnswer(f"{n} nodes for a budget of {params.budget}")
    match_length, occurrences = result.match_length, result.occurrences
    if match_length == 0:
        if n:
            raise InvalidAnswer("a tree without a match")
        return
    if not params.min_span <= match_length <= min(params.max_span, context_tokens):
        raise InvalidAnswer(
            f"match length {match_length} outside {params.min_span}.."
            f"{min(params.max_span, context_tokens)}"
        )
    if occurrences < 1:
        raise InvalidAnswer(f"a match of {match_length} tokens with {occurrences} occurrences")
    cut_count = getattr(result, "cut_count", 0)
    if cut_count > occurrences:
        raise InvalidAnswer(f"cut count {cut_count} above the {occurrences} occurrences")
    _check_tree(tokens, parents, counts, occurrences, params.max_depth, vocab_size)


def _check_tree(
    tokens: Sequence[int], parents: Sequence[int], counts: Sequence[int], occurrences: int,
    max_depth: int, vocab_size: int,
) -> None:
    n = len(tokens)
    if not n:
        return
    # Whole-array checks run in C; the loop below does only what needs the tree's order.
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        i = next(i for i, t in enumerate(tokens) if not 0 <= t < vocab_size)
        raise InvalidAnswer(f"node {i}: token {tokens[i]} outside the vocabulary"
                            f" 0..{vocab_size - 1}")
    if min(counts) < 1:
        i = next(i for i, c in enumerate(counts) if c < 1)
        raise InvalidAnswer(f"node {i}: count {counts[i]}")
    room = list(counts)  # what a node's count leaves for its children's counts
    root_room = occurrences
    depth = [0] * n
    for i, parent in enumerate(parents):
        if parent == -1:
            root_room -= counts[i]
            depth[i] = 1
        elif 0 <= parent < i:
            room[parent] -= counts[i]
            depth[i] = depth[parent] + 1
        else:
            raise InvalidAnswer(f"node {i}: parent {parent} is not an earlier node")
    if root_room < 0:
        raise InvalidAnswer(
            f"the first-level counts add up to more than the {occurrences} occurrences"
        )
    if min(room) < 0:
        parent = next(i for i, r in enumerate(room) if r < 0)
        raise InvalidAnswer(
            f"the counts of node {parent}'s children add up to more than its {counts[parent]}"
        )
    if max(depth) > max_depth:
        raise InvalidAnswer(f"a node at depth {max(depth)}, beyond max_depth {max_depth}")
    if len(set(zip(parents, tokens))) != n:
        raise InvalidAnswer("the same token twice under one parent")


def check_levels(
    levels: Sequence[SearchResult], params: SearchParams, context_tokens: int, vocab_size: int,
    max_levels: int,
) -> None:
    """Back-off levels (``RetrievalSession.search_levels``): each level is a valid answer, at
    most ``max_levels`` of them, every match one token shorter than the one before."""
    if len(levels) > max_levels:
        raise InvalidAnswer(f"{len(levels)} levels, {max_levels} asked for")
    previous = None
    for level in levels:
        if level.match_length == 0:
            raise InvalidAnswer("a back-off level without a match")
        check_result(level, params, context_tokens, vocab_size)
        if previous is not None and level.match_length != previous - 1:
            raise InvalidAnswer(
                f"level of match length {level.match_length} after one of {previous}"
            )
        previous = level.match_length
