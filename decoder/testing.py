"""An in-memory, brute-force ``Retriever`` over token sequences, for tests and benchmarks.

It answers like the datastore engine's ``policy="exact"`` in spirit (longest matching suffix,
then the most frequent continuations best first), by scanning every sequence: fine for a few
thousand tokens, and obviously right, which is the point.
"""

from __future__ import annotations

from collections.abc import Sequence

from decoder.draft_tree import DraftTree, count_trie
from rest.retriever import RetrievalSession, Retriever
from rest.types import EMPTY_RESULT, DatastoreInfo, SearchParams, SearchResult


class InMemoryRetriever(Retriever):
    """Continuations of the context's longest suffix found in ``sequences``.

    Only occurrences followed by at least one token count. The tree keeps the ``budget`` nodes of
    highest count (ties: shallower, then first seen).
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        tokenizer_fingerprint: str = "",
        tokenizer_name: str = "in-memory",
    ) -> None:
        self.sequences = [tuple(int(t) for t in seq) for seq in sequences]
        self._info = DatastoreInfo(
            format_version=0,
            vocab_size=max((max(s) for s in self.sequences if s), default=-1) + 1,
            n_tokens=sum(len(s) for s in self.sequences),
            n_docs=len(self.sequences),
            tokenizer_name=tokenizer_name,
            tokenizer_fingerprint=tokenizer_fingerprint,
        )

    def info(self) -> DatastoreInfo:
        return self._info

    def session(self) -> RetrievalSession:
        return _InMemorySession(self)

    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult:
        context = tuple(context)
        for n in range(min(params.max_span, len(context)), params.min_span - 1, -1):
            suffix = context[-n:]
            continuations = [
                seq[j + n : j + n + params.max_depth]
                for seq in self.sequences
                for j in range(len(seq) - n)
                if seq[j : j + n] == suffix
            ]
            if continuations:
                return _best_first(n, continuations, params.budget)
        return EMPTY_RESULT


def _best_first(match_length: int, continuations: list, budget: int) -> SearchResult:
    tokens, parents, counts = count_trie(continuations)
    # Pruning ranks by score; raw counts rank the same way as count / occurrences.
    tree = DraftTree(tokens, parents, counts).prune(budget)
    return SearchResult(
        match_length=match_length,
        occurrences=len(continuations),
        tokens=tuple(tree.tokens),
        parents=tuple(tree.parents),
        counts=tuple(int(c) for c in tree.scores),
    )


class _InMemorySession(RetrievalSession):
    def __init__(self, retriever: InMemoryRetriever) -> None:
        self.retriever = retriever

    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult | None:
        return self.retriever.search(context, params)
