"""decoder/ngram_index.py: incremental n-gram indexes and the bounded store of served outputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from decoder.ngram_index import NgramIndex, ServedOutputs


def test_an_occurrence_is_recorded_once_a_token_follows_it() -> None:
    index = NgramIndex(max_n=2)
    index.extend([1, 2, 3, 1, 2])
    assert index.latest((1, 2), limit=10) == [2]  # the (1, 2) ending the buffer: not yet
    assert index.latest((2,), limit=10) == [2]
    index.extend([4])
    assert index.latest((1, 2), limit=10) == [2, 5]
    assert index.latest((1, 2), limit=1) == [5]  # a limit keeps the latest occurrences
    assert index.latest((9,), limit=10) == []
    assert index.rows([2, 5], depth=3).tolist() == [[3, 1, 2], [4, -1, -1]]


def test_documents_are_never_crossed() -> None:
    index = NgramIndex(max_n=3)
    index.extend([1, 2])
    index.end_document()
    index.extend([3, 1, 2, 5])
    assert index.latest((2, 3), limit=10) == []  # spans the two documents
    assert index.latest((2,), limit=10) == [6]  # the first document's "2" ends it
    assert index.latest((1,), limit=10) == [1, 5]
    assert index.rows([1, 5], depth=4).tolist() == [
        [2, -1, 3, 1],  # read as it lies: the scorer ends a row at its first PAD
        [2, 5, -1, -1],
    ]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=4),
       st.integers(1, 4), st.lists(st.integers(0, 3), min_size=1, max_size=4))  # fmt: skip
def test_index_matches_brute_force(documents, max_n, ngram) -> None:
    ngram = tuple(ngram[:max_n])
    index = NgramIndex(max_n, capacity=2)  # a tiny buffer: growing is exercised too
    buffer: list[int] = []
    for number, document in enumerate(documents):
        if number:
            index.end_document()
            buffer.append(-1)
        half = len(document) // 2
        index.extend(document[:half])
        index.extend(document[half:])
        buffer.extend(document)
    n = len(ngram)
    want = [
        end for end in range(n, len(buffer))
        if tuple(buffer[end - n : end]) == ngram and buffer[end] >= 0
        and -1 not in buffer[end - n : end]
    ]  # fmt: skip
    assert index.latest(ngram, limit=100) == want
    assert index.latest(ngram, limit=2) == want[-2:]
    assert len(index) == len(buffer)


def test_served_outputs_stay_within_their_token_cap() -> None:
    served = ServedOutputs(max_n=2, max_tokens=40, segments=4)
    for i in range(50):
        served.add([100 + i, 7, 8])  # 3 tokens and a separator each
        assert served.tokens <= 40
    indexes = served.segments()  # newest first
    newest = [pos for index in indexes for pos in index.latest((149,), 10)]
    oldest = [pos for index in indexes for pos in index.latest((100,), 10)]
    assert newest and not oldest  # the oldest outputs were dropped, the newest kept
    assert served.tokens >= 40 - 10  # dropped a segment (about a quarter) at a time


def test_an_output_longer_than_the_cap_keeps_its_end() -> None:
    served = ServedOutputs(max_n=1, max_tokens=10)
    served.add(list(range(100)))
    assert served.tokens <= 10
    (index,) = served.segments()
    assert index.latest((98,), 10) and not index.latest((50,), 10)
    served.add([])  # nothing to remember
    served.clear()
    assert served.tokens == 0 and served.segments() == []
