"""decoder/draft_sources.py: prompt lookup, retriever drafts, and the failure guard."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decoder.draft_sources import (
    ContextDraftSource,
    GuardedDraftSource,
    RetrieverDraftSource,
    scored_trie,
)
from decoder.draft_tree import EMPTY_DRAFT, Draft
from rest.retriever import RetrievalSession
from rest.types import SearchParams, SearchResult
from tests.decoder.helpers import FunctionSource


def as_paths(draft: Draft) -> dict[tuple[int, ...], float]:
    out: list[tuple[int, ...]] = []
    for token, parent in zip(draft.tokens, draft.parents):
        out.append((out[parent] if parent >= 0 else ()) + (token,))
    return dict(zip(out, draft.scores))


def test_context_lookup_uses_the_longest_suffix_that_occurred_before() -> None:
    # suffix [1, 2, 3] occurred twice before; [3, 1, 2, 3] never did.
    context = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    draft = ContextDraftSource(max_ngram=4, max_length=2).propose(context)
    assert as_paths(draft) == {(9,): 0.5, (9, 1): 0.5, (7,): 0.5, (7, 1): 0.5}


def test_context_lookup_scores_by_frequency_among_the_occurrences() -> None:
    context = [4, 5, 4, 5, 4, 6, 4]  # "4" occurred 3 times before: followed by 5, 5, 6
    draft = ContextDraftSource(max_ngram=1, max_length=1).propose(context)
    assert as_paths(draft) == pytest.approx({(5,): 2 / 3, (6,): 1 / 3})


def test_context_lookup_keeps_the_latest_occurrences() -> None:
    context = [4, 5, 4, 6, 4, 7, 4]
    draft = ContextDraftSource(max_ngram=1, max_length=1, max_occurrences=2).propose(context)
    assert as_paths(draft) == {(6,): 0.5, (7,): 0.5}


def test_context_lookup_finds_nothing_without_an_earlier_occurrence() -> None:
    source = ContextDraftSource(min_ngram=2, max_ngram=3)
    assert source.propose([1, 2, 3, 4, 3]) is EMPTY_DRAFT  # "3" recurs but is shorter than 2
    assert source.propose([7]) is EMPTY_DRAFT
    assert source.propose([]) is EMPTY_DRAFT


def test_a_continuation_may_run_into_the_suffix_itself() -> None:
    # The only earlier "8 8" starts at 0; its continuation is the rest of the context.
    draft = ContextDraftSource(min_ngram=2, max_ngram=2, max_length=5).propose([8, 8, 8])
    assert as_paths(draft) == {(8,): 1.0}


def brute_force_lookup(context, min_ngram, max_ngram, max_length, max_occurrences):
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= len(context):
            continue
        suffix = context[-n:]
        starts = [j for j in range(len(context) - n) if context[j : j + n] == suffix]
        if starts:
            latest = starts[-max_occurrences:]
            return scored_trie([context[j + n : j + n + max_length] for j in latest])
    return EMPTY_DRAFT


@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.integers(1, 3),
    st.integers(0, 2),
    st.integers(1, 6),
    st.integers(1, 5),
)
def test_context_lookup_matches_brute_force(context, min_ngram, extra, max_length, max_occ):
    source = ContextDraftSource(min_ngram, min_ngram + extra, max_length, max_occ)
    want = brute_force_lookup(context, min_ngram, min_ngram + extra, max_length, max_occ)
    assert source.propose(context) == want


class Session(RetrievalSession):
    def __init__(self, answer) -> None:
        self.answer = answer
        self.contexts: list[list[int]] = []
        self.closed = False

    def search(self, context, params):
        self.contexts.append(list(context))
        return self.answer

    def close(self) -> None:
        self.closed = True


def test_retriever_drafts_are_scored_by_count_over_occurrences() -> None:
    result = SearchResult(match_length=2, occurrences=4, tokens=(5, 6, 7), parents=(-1, 0, -1),
                          counts=(3, 1, 1))  # fmt: skip
    session = Session(result)
    source = RetrieverDraftSource(session, SearchParams(min_span=1, max_span=3))
    draft = source.propose(list(range(10)))
    assert as_paths(draft) == {(5,): 0.75, (5, 6): 0.25, (7,): 0.25}
    assert session.contexts == [[7, 8, 9]]  # only the last max_span tokens travel
    source.close()
    assert session.closed


def test_a_retriever_that_returns_none_counts_a_failure() -> None:
    source = RetrieverDraftSource(Session(None), SearchParams())
    assert source.propose([1, 2, 3]) is EMPTY_DRAFT and source.failures == 1
    empty = RetrieverDraftSource(Session(SearchResult(0, 0)), SearchParams())
    assert empty.propose([1, 2, 3]) is EMPTY_DRAFT and empty.failures == 0  # no match: no failure


def boom(context):
    raise RuntimeError("engine crashed")


@pytest.mark.parametrize("deadline", [None, 1.0])
def test_guard_turns_errors_into_empty_drafts(deadline) -> None:
    guarded = GuardedDraftSource(FunctionSource(boom), deadline)
    assert guarded.propose([1]) is EMPTY_DRAFT and guarded.failures == 1
    good = GuardedDraftSource(FunctionSource(lambda c: Draft((5,), (-1,), (1.0,))), deadline)
    assert good.propose([1]).tokens == (5,) and good.failures == 0
    guarded.close()
    good.close()


def test_guard_abandons_a_late_proposal_and_skips_while_it_runs() -> None:
    release = threading.Event()
    seen: list[tuple[int, ...]] = []

    def slow(context):
        seen.append(tuple(context))
        release.wait(5)
        return Draft((5,), (-1,), (1.0,))

    guarded = GuardedDraftSource(FunctionSource(slow), deadline_s=0.02)
    context = [1, 2]
    start = time.monotonic()
    assert guarded.propose(context) is EMPTY_DRAFT
    context.append(3)  # the decoder goes on; the late call must still see its own snapshot
    assert guarded.propose(context) is EMPTY_DRAFT  # busy: no second call is queued
    assert time.monotonic() - start < 1.0
    assert guarded.failures == 2
    release.set()
    guarded._pending.result(timeout=5)  # the late call finishes on its own
    assert guarded.propose(context).tokens == (5,)  # free again
    assert seen == [(1, 2), (1, 2, 3)]
    guarded.close()
