"""A brute-force reference for datastore search: plain Python over the documents, no index.

It encodes the specification that the Rust engine must meet (see rest/types.py SearchParams).
"""

from __future__ import annotations

import heapq

SEP = object()  # sorts after every token id (see _key)
REST_MAX_OCCURRENCES = 5000


def shard_documents(docs, shard_tokens):
    """Documents grouped into shards exactly as the builder groups them."""
    shards, current, used = [], [], 0
    for doc in docs:
        if not doc:
            continue
        needed = len(doc) + 1
        if current and used + needed > shard_tokens:
            shards.append(current)
            current, used = [], 0
        current.append(list(doc))
        used += needed
    if current:
        shards.append(current)
    return shards


def occurrences(docs, pattern):
    """(doc index, start) of every occurrence of ``pattern`` inside one document."""
    n = len(pattern)
    return [(d, i) for d, doc in enumerate(docs) for i in range(len(doc) - n + 1) if doc[i : i + n] == list(pattern)]


def longest_match(docs, context, min_span, max_span):
    for length in range(min(max_span, len(context)), min_span - 1, -1):
        occ = occurrences(docs, context[len(context) - length :])
        if occ:
            return length, occ
    return 0, []


def exact_search(docs, context, min_span=2, max_span=16, budget=64, max_depth=10):
    """(match_length, occurrences, tokens, parents, counts) by the exact policy."""
    return exact_search_with_cut(docs, context, min_span, max_span, budget, max_depth)[0]


def exact_levels(docs, context, levels, min_span=2, max_span=16, budget=64, max_depth=10):
    """Back-off levels as ``search_levels`` defines them: ``[(search tuple, cut_count), ...]`` for
    the longest match ``m``, then ``max_span = m - 1``, ``m - 2``, ... down to ``min_span``;
    ``[]`` when nothing matches."""
    out = []
    span = max_span
    while len(out) < levels and span >= min_span:
        found = exact_search_with_cut(docs, context, min_span, span, budget, max_depth)
        if found[0][0] == 0:
            break
        out.append(found)
        span = found[0][0] - 1
    return out


def exact_search_with_cut(docs, context, min_span=2, max_span=16, budget=64, max_depth=10):
    """``(exact_search tuple, cut_count)``: the cut count is the largest count of a node left out
    by the budget (every child of every added node is a candidate), 0 when none was."""
    length, occ = longest_match(docs, context, min_span, max_span)
    if length == 0:
        return (0, 0, [], [], []), 0
    continuations = [docs[d][i + length : i + length + max_depth] for d, i in occ]

    def children(path):
        counts = {}
        for c in continuations:
            if len(c) > len(path) and c[: len(path)] == path:
                counts[c[len(path)]] = counts.get(c[len(path)], 0) + 1
        return counts

    tokens, parents, counts = [], [], []
    heap = []  # (-count, depth, parent index, token, path)
    for tok, cnt in children([]).items():
        heapq.heappush(heap, (-cnt, 1, -1, tok, [tok]))
    while heap and len(tokens) < budget:
        neg, depth, parent, tok, path = heapq.heappop(heap)
        index = len(tokens)
        tokens.append(tok)
        parents.append(parent)
        counts.append(-neg)
        if depth < max_depth:
            for child, cnt in children(path).items():
                heapq.heappush(heap, (-cnt, depth + 1, index, child, path + [child]))
    cut_count = -heap[0][0] if heap else 0
    return (length, len(occ), tokens, parents, counts), cut_count


def _suffix_order_occurrences(shard_docs, pattern, limit, key_len=None):
    """The first ``limit`` occurrences of ``pattern`` in suffix-array order within one shard.

    ``key_len`` compares only that many tokens of each suffix: exact for random texts whose
    suffixes never share that long a prefix, and it keeps the sort fast on long texts."""
    text = []
    starts = []
    for doc in shard_docs:
        starts.append(len(text))
        text.extend(doc)
        text.append(SEP)
    positions = [p for p in range(len(text)) if text[p : p + len(pattern)] == list(pattern)]

    def key(p):
        return [(1, 0) if t is SEP else (0, t) for t in text[p : p + key_len if key_len else None]]

    positions.sort(key=key)
    return [(text, p) for p in positions[:limit]]


def rest_search(shards, context, min_span=2, max_span=16, budget=64, max_depth=10, key_len=None):
    """The original REST policy, over documents already grouped into shards."""
    docs = [d for shard in shards for d in shard]
    length, occ = longest_match(docs, context, min_span, max_span)
    if length == 0:
        return 0, 0, [], [], []
    pattern = context[len(context) - length :]
    taken = []
    for shard_docs in shards:
        taken += _suffix_order_occurrences(shard_docs, pattern, REST_MAX_OCCURRENCES - len(taken), key_len)
    counts = {}
    for text, p in taken:
        path = []
        for t in text[p + length : p + length + max_depth]:
            if t is SEP:
                break
            path.append(t)
            counts[tuple(path)] = counts.get(tuple(path), 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))[:budget]
    distinct = [len(set(path)) for path, _ in ranked]
    total = sum(distinct)
    dropped = set()
    for i in sorted(range(len(ranked)), key=lambda i: (-distinct[i], i)):
        if total <= budget:
            break
        total -= distinct[i]
        dropped.add(i)
    nodes = {}
    for i, (path, _) in enumerate(ranked):
        if i not in dropped:
            for k in range(1, len(path) + 1):
                nodes[path[:k]] = counts[path[:k]]
    order = sorted(nodes.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    index = {path: i for i, (path, _) in enumerate(order)}
    tokens = [path[-1] for path, _ in order]
    parents = [index[path[:-1]] if len(path) > 1 else -1 for path, _ in order]
    return length, len(occ), tokens, parents, [c for _, c in order]
