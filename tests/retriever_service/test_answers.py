"""Answer checks: every engine answer passes, every broken one is refused with its reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rest.types import SearchParams, SearchResult
from retriever_service.answers import InvalidAnswer, check_levels, check_result
from tests.retriever_service.service_testing import VOCAB, random_contexts

PARAMS = SearchParams(min_span=1, max_span=12, budget=32, max_depth=5)


@pytest.mark.parametrize("params", [
    SearchParams(), SearchParams(min_span=1, budget=8, max_depth=3), PARAMS,
    SearchParams(policy="rest", budget=32), SearchParams(policy="rest", min_span=1, budget=64),
], ids=repr)
def test_every_engine_answer_passes(datastore, documents, params):
    for context in random_contexts(documents, 200, seed=4):
        tail = context[-params.max_span:]
        check_result(datastore.search(context, params), params, len(tail), VOCAB)


GOOD = SearchResult(3, 5, tokens=(7, 8, 9, 7), parents=(-1, -1, 0, 2), counts=(3, 2, 2, 1))


def test_a_good_hand_made_answer_passes():
    check_result(GOOD, PARAMS, 10, VOCAB)
    check_result(SearchResult(0, 0), PARAMS, 10, VOCAB)


@pytest.mark.parametrize("broken, reason", [
    (replace(GOOD, parents=(-1, -1, 0)), "one of each per node"),
    (replace(GOOD, parents=(-1, -1, 5, 2)), "parent 5 is not an earlier node"),
    (replace(GOOD, parents=(-1, -1, 2, 2)), "parent 2 is not an earlier node"),
    (replace(GOOD, parents=(-1, -2, 0, 2)), "parent -2"),
    (replace(GOOD, tokens=(7, VOCAB, 9, 7)), "outside the vocabulary"),
    (replace(GOOD, tokens=(7, -1, 9, 7)), "outside the vocabulary"),
    (replace(GOOD, counts=(3, 0, 2, 1)), "count 0"),
    (replace(GOOD, counts=(3, 2, 4, 1)), "children add up to more"),  # 4 > its parent's 3
    (replace(GOOD, counts=(4, 2, 2, 1)), "add up to more than the 5 occurrences"),
    (replace(GOOD, occurrences=0), "0 occurrences"),
    (replace(GOOD, match_length=0), "a tree without a match"),
    (replace(GOOD, match_length=13), "match length 13"),
    (replace(GOOD, match_length=11), "match length 11"),  # longer than the 10 tokens sent
    (replace(GOOD, tokens=(7, 7, 9, 7)), "the same token twice under one parent"),
    (SearchResult(3, 50, (1,) * 6, (-1, 0, 1, 2, 3, 4), (9,) * 6), "depth 6"),
    (SearchResult(3, 99, tuple(range(33)), (-1,) * 33, (1,) * 33), "33 nodes"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_broken_answers_are_refused_with_their_reason(broken, reason):
    with pytest.raises(InvalidAnswer, match=reason):
        check_result(broken, PARAMS, 10, VOCAB)


def test_levels_must_back_off_one_token_at_a_time():
    second = replace(GOOD, match_length=2, occurrences=9, counts=(5, 3, 2, 1))
    check_levels([GOOD, second], PARAMS, 10, VOCAB, max_levels=3)
    with pytest.raises(InvalidAnswer, match="2 levels, 1 asked for"):
        check_levels([GOOD, second], PARAMS, 10, VOCAB, max_levels=1)
    with pytest.raises(InvalidAnswer, match="after one of 3"):
        check_levels([GOOD, replace(second, match_length=1)], PARAMS, 10, VOCAB, max_levels=3)
    with pytest.raises(InvalidAnswer, match="without a match"):
        check_levels([SearchResult(0, 0)], PARAMS, 10, VOCAB, max_levels=3)
