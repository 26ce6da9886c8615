"""decoder/testing.py: the in-memory reference retriever."""

from __future__ import annotations

from decoder.testing import InMemoryRetriever
from rest.types import SearchParams


def test_longest_suffix_then_most_frequent_continuations() -> None:
    retriever = InMemoryRetriever([[1, 2, 3, 4], [9, 2, 3, 5, 6], [2, 3, 4, 7]], "fp")
    params = SearchParams(min_span=1, max_span=4, budget=64, max_depth=2)
    result = retriever.session().search([8, 2, 3], params)  # "8 2 3" never occurs; "2 3" does
    assert result.match_length == 2 and result.occurrences == 3
    assert dict(zip(result.paths(), result.counts)) == {
        (4,): 2, (5,): 1, (4, 7): 1, (5, 6): 1,
    }  # fmt: skip
    pruned = retriever.search([2, 3], SearchParams(min_span=1, budget=2, max_depth=2))
    assert dict(zip(pruned.paths(), pruned.counts)) == {(4,): 2, (5,): 1}
    assert retriever.search([42], params).match_length == 0
    info = retriever.info()
    assert info.tokenizer_fingerprint == "fp" and info.n_tokens == 13 and info.vocab_size == 10
