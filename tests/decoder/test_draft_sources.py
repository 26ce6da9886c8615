"""decoder/draft_sources.py: the context, served-output and retriever sources, their levels, the
failure guard, and one step's drafting."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoder.config import DecodingConfig, NgramParams
from decoder.draft_sources import (
    ContextDraftSource,
    GuardedDraftSource,
    RetrieverDraftSource,
    ServedDraftSource,
    draft_tree,
    match_trust,
    open_draft_sources,
    served_outputs,
)
from decoder.draft_tree import Level
from decoder.ngram_index import ServedOutputs
from rest.retriever import RetrievalSession
from rest.types import SearchParams, SearchResult
from tests.decoder.trees import assert_same_tree
from tests.decoder.helpers import FakeRetriever, FunctionSource, chain


def summary(levels: list[Level]) -> list[tuple[int, int, dict]]:
    """(match length, occurrences, counts) of each level, in order."""
    return [(level.match_length, level.occurrences, level.counts()) for level in levels]


# --- the context ------------------------------------------------------------------------------


def test_context_levels_back_off_from_the_longest_suffix_that_occurred() -> None:
    context = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]
    levels = ContextDraftSource(NgramParams(max_ngram=4, max_length=2)).propose(context)
    both = {(9,): 1.0, (9, 1): 1.0, (7,): 1.0, (7, 1): 1.0}
    # [3, 1, 2, 3] never occurred before; [1, 2, 3], [2, 3] and [3] did, twice each.
    assert summary(levels) == [(3, 2, both), (2, 2, both), (1, 2, both)]
    assert all(level.trust == 1.0 for level in levels)


def test_context_levels_keep_the_latest_occurrences() -> None:
    context = [4, 5, 4, 6, 4, 7, 4]
    params = NgramParams(max_ngram=1, max_length=1, max_occurrences=2)
    assert summary(ContextDraftSource(params).propose(context)) == [
        (1, 2, {(6,): 1.0, (7,): 1.0})
    ]


def test_context_finds_nothing_without_an_earlier_occurrence() -> None:
    source = ContextDraftSource(NgramParams(min_ngram=2, max_ngram=3))
    assert source.propose([1, 2, 3, 4, 3]) == []  # "3" recurs, but only n >= 2 counts here
    assert source.propose([7]) == []
    assert source.propose([]) == []


def test_a_continuation_may_run_into_the_suffix_itself() -> None:
    # The only earlier "8 8" starts at 0; its continuation is the rest of the context.
    levels = ContextDraftSource(NgramParams(2, 2, max_length=5)).propose([8, 8, 8])
    assert summary(levels) == [(2, 1, {(8,): 1.0})]


def brute_force_context(context, params: NgramParams):
    out = []
    for n in range(min(params.max_ngram, len(context)), params.min_ngram - 1, -1):
        suffix = context[-n:]
        starts = [j for j in range(len(context) - n) if context[j : j + n] == suffix]
        latest = starts[-params.max_occurrences :]
        if latest:
            continuations = [context[j + n : j + n + params.max_length] for j in latest]
            out.append((n, len(latest), Level.from_continuations(n, continuations, 0).counts()))
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.integers(1, 3),
    st.integers(0, 2),
    st.integers(1, 6),
    st.integers(1, 5),
    st.lists(st.integers(1, 4), max_size=8),
)
def test_the_growing_index_matches_brute_force(context, min_n, extra, length, occ, steps):
    """Proposals along a growing context (as a generation's steps) equal a brute-force scan of
    each context; a context that does not extend the last one is indexed afresh."""
    params = NgramParams(min_n, min_n + extra, length, occ)
    source = ContextDraftSource(params)
    end = min(len(context), 1)
    for step in steps + [len(context)]:
        end = min(end + step, len(context))
        assert summary(source.propose(context[:end])) == brute_force_context(context[:end], params)
    other = [9] + context[1:]  # the same length, another first token
    assert summary(source.propose(other)) == brute_force_context(other, params)


# --- served outputs ---------------------------------------------------------------------------


def test_served_levels_come_from_earlier_outputs_only() -> None:
    served = ServedOutputs(max_n=4, max_tokens=100)
    source = ServedDraftSource(served, NgramParams(max_ngram=4, max_length=3, trust=3.0))
    assert source.propose([5, 6, 7]) == []
    served.add([6, 7, 8, 9, 1])
    served.add([7, 2])
    levels = source.propose([5, 6, 7])
    after_6_7 = {(8,): 1.0, (8, 9): 1.0, (8, 9, 1): 1.0}
    assert summary(levels) == [(2, 1, after_6_7), (1, 2, {**after_6_7, (2,): 1.0})]
    assert all(level.trust == 3.0 for level in levels)
    # A continuation never runs from one output into the next.
    assert summary(source.propose([1])) == []


def test_served_source_needs_the_store_to_index_long_enough_ngrams() -> None:
    with pytest.raises(ValueError, match="up to 2"):
        ServedDraftSource(ServedOutputs(max_n=2, max_tokens=10), NgramParams(max_ngram=3))


# --- the retriever ----------------------------------------------------------------------------


class Session(RetrievalSession):
    """Answers with ``answers`` in turn (then nothing), recording what was asked."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[list[int], int]] = []
        self.closed = False

    def search(self, context, params):
        self.asked.append((list(context), params.max_span))
        return self.answers.pop(0) if self.answers else SearchResult(0, 0)

    def close(self) -> None:
        self.closed = True


def result(match_length, occurrences, tokens, parents, counts) -> SearchResult:
    return SearchResult(match_length, occurrences, tuple(tokens), tuple(parents), tuple(counts))


def test_retriever_levels_back_off_to_shorter_matches() -> None:
    session = Session(
        result(3, 4, (5, 6, 7), (-1, 0, -1), (3, 1, 1)),
        result(2, 9, (5, 8), (-1, -1), (5, 4)),
        result(1, 50, (5,), (-1,), (50,)),
    )
    source = RetrieverDraftSource(session, SearchParams(min_span=1, max_span=4), levels=3,
                                  trust=16.0)  # fmt: skip
    levels = source.propose(list(range(10)))
    assert summary(levels) == [
        (3, 4, {(5,): 3.0, (5, 6): 1.0, (7,): 1.0}),
        (2, 9, {(5,): 5.0, (8,): 4.0}),
        (1, 50, {(5,): 50.0}),
    ]
    assert all(level.trust == 16.0 for level in levels)  # matches of up to 4 tokens
    # Only the last max_span tokens travel; each next search is for a shorter match.
    assert session.asked == [([6, 7, 8, 9], 4), ([8, 9], 2), ([9], 1)]
    source.close()
    assert session.closed


def test_retriever_levels_stop_at_min_span_and_at_the_level_count() -> None:
    session = Session(result(2, 1, (5,), (-1,), (1,)), result(1, 3, (6,), (-1,), (3,)))
    source = RetrieverDraftSource(session, SearchParams(min_span=2, max_span=5), levels=3)
    assert [level.match_length for level in source.propose(list(range(8)))] == [2]
    assert len(session.asked) == 1  # a match of min_span leaves nothing shorter to ask for
    session = Session(result(4, 1, (5,), (-1,), (1,)), result(3, 2, (6,), (-1,), (2,)))
    source = RetrieverDraftSource(session, SearchParams(min_span=1, max_span=5), levels=1)
    assert len(source.propose(list(range(8)))) == 1 and len(session.asked) == 1


def test_a_failed_search_counts_and_gives_no_levels() -> None:
    # The levels arrive in one answer (one engine call, one round trip): a failure loses them all.
    session = Session(result(3, 2, (5,), (-1,), (2,)), None)
    source = RetrieverDraftSource(session, SearchParams(min_span=1), levels=3)
    assert source.propose([1, 2, 3]) == []
    assert source.failures == 1
    nothing = RetrieverDraftSource(Session(SearchResult(0, 0)), SearchParams(), levels=3)
    assert nothing.propose([1, 2, 3]) == [] and nothing.failures == 0  # no match: no failure


# --- the guard --------------------------------------------------------------------------------


def boom(context):
    raise RuntimeError("engine crashed")


@pytest.mark.parametrize("deadline", [None, 1.0])
def test_guard_turns_errors_into_no_levels(deadline) -> None:
    guarded = GuardedDraftSource(FunctionSource(boom), deadline)
    assert guarded.propose([1]) == [] and guarded.failures == 1
    good = GuardedDraftSource(FunctionSource(lambda c: [chain([5])]), deadline)
    assert len(good.propose([1])) == 1 and good.failures == 0
    guarded.close()
    good.close()


def test_guard_abandons_a_late_proposal_and_skips_while_it_runs() -> None:
    release = threading.Event()
    seen: list[tuple[int, ...]] = []

    def slow(context):
        seen.append(tuple(context))
        release.wait(5)
        return [chain([5])]

    guarded = GuardedDraftSource(FunctionSource(slow), deadline_s=0.02)
    context = [1, 2]
    start = time.monotonic()
    assert guarded.propose(context) == []
    context.append(3)  # the decoder goes on; the late call must still see its own snapshot
    assert guarded.propose(context) == []  # busy: no second call is queued
    assert time.monotonic() - start < 1.0
    assert guarded.failures == 2
    release.set()
    guarded._pending.result(timeout=5)  # the late call finishes on its own
    assert len(guarded.propose(context)) == 1  # free again
    assert seen == [(1, 2), (1, 2, 3)]
    guarded.close()


# --- one step's drafting ----------------------------------------------------------------------


def test_the_default_sources_follow_the_config() -> None:
    retriever = FakeRetriever(lambda c, p: SearchResult(0, 0))
    config = DecodingConfig(drafting="python")
    served = served_outputs(config)
    kinds = [type(s).__name__ for s in open_draft_sources(config, retriever, served)]
    assert kinds == ["ContextDraftSource", "ServedDraftSource", "GuardedDraftSource"]
    for drafting in ("python", "native"):
        bare = DecodingConfig(context_drafts=False, served_drafts=False, drafting=drafting)
        assert served_outputs(bare) is None
        assert open_draft_sources(bare, None, None) == []


def test_native_drafting_keeps_a_remote_retriever_as_a_source_of_its_own(tmp_path) -> None:
    """The context and served outputs go to the engine; a remote retriever's levels are scored
    there too (draft_tree hands them over); an in-process datastore is searched there."""
    from rest.datastore import build_datastore
    from rest.retriever import LocalRetriever

    config = DecodingConfig()
    served = served_outputs(config)
    assert served.native
    remote = FakeRetriever(lambda c, p: SearchResult(0, 0))
    kinds = [type(s).__name__ for s in open_draft_sources(config, remote, served)]
    assert kinds == ["NativeDrafter", "GuardedDraftSource"]
    build_datastore(tmp_path / "ds", [[1, 2, 3]], vocab_size=8, tokenizer_name="t", tokenizer_fingerprint="f")
    local = LocalRetriever(str(tmp_path / "ds"))
    assert [type(s).__name__ for s in open_draft_sources(config, local, served)] == ["NativeDrafter"]
    with pytest.raises(ValueError, match="indexed in the engine"):
        open_draft_sources(config, None, ServedOutputs(max_n=4, max_tokens=100))


@pytest.mark.parametrize("drafting", ["native", "python"])
def test_one_step_scores_every_source_into_one_tree(drafting) -> None:
    served = ServedOutputs(max_n=4, max_tokens=100, native=drafting == "native")
    served.add([3, 4, 5])
    config = DecodingConfig(budget=3, drafting=drafting)
    session_search = lambda context, params: result(1, 2, (4, 9), (-1, -1), (1, 1))  # noqa: E731
    sources = open_draft_sources(config, FakeRetriever(session_search), served)
    tree = draft_tree(sources, [1, 3, 7, 3], budget=3, vocab_size=50)
    assert len(tree) == 3
    # context ("3" -> 7), served ("3" -> 4 5) and datastore (4, 9) all speak.
    assert {4, 7}.issubset(set(tree.tokens))
    for source in sources:
        source.close()


# --- native drafting against the reference ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_datastore(tmp_path_factory):
    from rest.datastore import build_datastore
    from rest.retriever import LocalRetriever

    import random

    rng = random.Random(7)
    docs = [[rng.randrange(6) for _ in range(rng.randrange(5, 40))] for _ in range(30)]
    path = tmp_path_factory.mktemp("native") / "ds"
    build_datastore(path, docs, vocab_size=8, tokenizer_name="t", tokenizer_fingerprint="f")
    return LocalRetriever(str(path))


@settings(max_examples=60, deadline=None)
@given(
    outputs=st.lists(st.lists(st.integers(0, 5), max_size=30), max_size=5),
    generation=st.lists(st.integers(0, 7), min_size=2, max_size=60),
    budget=st.one_of(st.none(), st.integers(0, 24)),
    levels=st.integers(1, 3),
    min_span=st.integers(1, 2),
    use=st.sampled_from(["all", "no-context", "no-served", "no-datastore"]),
)
def test_native_drafting_gives_the_reference_trees(tiny_datastore, outputs, generation, budget, levels,
                                                    min_span, use) -> None:
    """Step by step along a growing context, with served outputs and a datastore: the engine's
    tree is the Python sources' and scorer's, node for node."""
    config = {"retrieval_levels": levels, "search": SearchParams(min_span=min_span, budget=12),
              "retrieval_deadline_s": None, "context_drafts": use != "no-context",
              "served_drafts": use != "no-served", "served_max_tokens": 64}
    retriever = None if use == "no-datastore" else tiny_datastore
    drafters = {}
    for drafting in ("native", "python"):
        c = DecodingConfig(drafting=drafting, **config)
        served = served_outputs(c)
        for output in outputs:
            if served is not None:
                served.add(output)
        drafters[drafting] = open_draft_sources(c, retriever, served)
    for end in range(1, len(generation) + 1):
        context = generation[:end]
        native = draft_tree(drafters["native"], context, budget, 8)
        reference = draft_tree(drafters["python"], context, budget, 8)
        assert_same_tree(native, reference)
    for sources in drafters.values():
        for source in sources:
            source.close()


def test_native_drafting_starts_afresh_on_a_context_that_does_not_extend_the_last() -> None:
    config = DecodingConfig(served_drafts=False)
    (native,) = open_draft_sources(config, None, None)
    assert native.draft([1, 2, 3, 1, 2]).tokens[:1] == [3]
    assert native.draft([5, 6, 5]).tokens[:1] == [6]  # not 1 2 3 1 2 ... any more
    assert native.draft([5, 6, 5, 9, 5]).tokens[:1] in ([6], [9])


def test_native_drafting_counts_a_failed_search_and_drafts_without_it(tiny_datastore) -> None:
    config = DecodingConfig(served_drafts=False, context_drafts=False)
    (native,) = open_draft_sources(config, tiny_datastore, None)
    assert len(draft_tree([native], [1, 2, 3], 8, 8)) > 0 and native.failures == 0
    # A token outside the datastore's vocabulary: the search is refused, the step has no drafts.
    assert len(draft_tree([native], [1, 2, 3, 99], 8, 8)) == 0
    assert native.failures == 1


def test_short_suffix_answers_are_cached_across_generations_and_change_nothing(tiny_datastore) -> None:
    contexts = [[1, 2, 3, 4, 5, 1, 2], [5, 4, 3, 2, 1, 2], [0, 3, 2, 1, 2]]
    trees = {}
    for drafting in ("native", "python"):
        config = DecodingConfig(drafting=drafting, retrieval_deadline_s=None)
        served = served_outputs(config)
        trees[drafting] = []
        for context in contexts:  # one generation each, sharing the served outputs
            sources = open_draft_sources(config, tiny_datastore, served)
            trees[drafting] += [draft_tree(sources, context[:end], 16, 8) for end in range(1, len(context) + 1)]
            for source in sources:
                source.close()
        if drafting == "native":
            held, hits, misses = served.search_cache.stats
            assert held > 0 and hits > 0 and misses > 0
    for native, reference in zip(trees["native"], trees["python"]):
        assert_same_tree(native, reference)


def test_a_long_datastore_match_needs_proportionally_less_trust() -> None:
    assert [match_trust(16.0, m) for m in (1, 4, 5, 8, 16)] == [16.0, 16.0, 12.8, 8.0, 4.0]
    session = Session(result(8, 2, (5,), (-1,), (2,)), result(3, 9, (5, 8), (-1, -1), (5, 4)))
    source = RetrieverDraftSource(session, SearchParams(min_span=1, max_span=16), levels=2,
                                  trust=16.0)  # fmt: skip
    assert [(level.match_length, level.trust) for level in source.propose(list(range(20)))] == [
        (8, 8.0), (3, 16.0)]
