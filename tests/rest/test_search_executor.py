"""Datastore.try_search and the native SearchExecutor against Datastore.search_levels, with and
without a search session."""

import random
import select
import time

import pytest

from rest.datastore import Datastore, build_datastore
from rest.types import SearchParams

PARAMS = [
    SearchParams(min_span=1, budget=16),
    SearchParams(min_span=1, max_span=4, budget=40, max_depth=6),
    SearchParams(min_span=2, budget=0),
    SearchParams(min_span=1, budget=16, policy="rest"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    docs = [[rng.randrange(6) for _ in range(rng.randrange(20, 400))] for _ in range(30)]
    path = tmp_path_factory.mktemp("executor") / "ds"
    build_datastore(path, docs, vocab_size=8, tokenizer_name="t", tokenizer_fingerprint="f",
                    shard_tokens=2000)
    contexts = [[rng.randrange(8) for _ in range(rng.randrange(1, 12))] for _ in range(60)]
    return Datastore.open(path), contexts


def collect(executor, n: int, timeout: float = 20.0) -> dict:
    """Waits on the executor's file descriptor, as an event loop would, until n outcomes came."""
    outcomes: dict = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < n:
        readable, _, _ = select.select([executor.fileno()], [], [], deadline - time.monotonic())
        assert readable, f"only {len(outcomes)} of {n} searches completed"
        for tag, outcome in executor.completed():
            assert tag not in outcomes
            outcomes[tag] = outcome
    return outcomes


@pytest.mark.parametrize("params", PARAMS, ids=repr)
def test_try_search_with_time_is_search(corpus, params):
    ds, contexts = corpus
    shards = [None, ["shard-00001"]]
    session = ds.session()
    for i, context in enumerate(contexts):
        only = shards[i % 2]
        levels = 1 + i % 3
        result = ds.try_search(context, params, only, time_limit_s=10.0, levels=levels)
        in_session = ds.try_search(context, params, only, time_limit_s=10.0, levels=levels,
                                   session=session)
        assert result == in_session == ds.search_levels(context, params, levels, shards=only)


@pytest.mark.parametrize("policy", ["exact", "rest"])
def test_try_search_out_of_time_gives_up(corpus, policy):
    ds, _ = corpus
    params = SearchParams(min_span=1, max_span=2, budget=200, max_depth=8, policy=policy)
    assert ds.search([1, 2], params).tokens  # there is a tree to grow...
    assert ds.try_search([1, 2], params, None, time_limit_s=0.0) is None  # ...but no time


@pytest.mark.parametrize("params", PARAMS, ids=repr)
def test_executor_results_equal_search(corpus, params):
    ds, contexts = corpus
    executor = ds.search_executor(workers=3)
    try:
        for tag, context in enumerate(contexts):
            executor.submit(tag, context, params, levels=1 + tag % 3)
        outcomes = collect(executor, len(contexts))
        expected = {tag: ds.search_levels(c, params, 1 + tag % 3) for tag, c in enumerate(contexts)}
        assert outcomes == expected
        # A session's searches go one at a time, as one stream of the server sends them.
        session = ds.session()
        for tag, context in enumerate(contexts):
            executor.submit(tag, context, params, levels=1 + tag % 3, session=session)
            assert collect(executor, 1) == {tag: expected[tag]}
        assert executor.completed() == []
    finally:
        executor.close()


def test_executor_reports_errors_and_expired_deadlines(corpus):
    ds, _ = corpus
    executor = ds.search_executor(workers=1)
    try:
        executor.submit(1, [1, 2], SearchParams(min_span=1), shards=["shard-00001"])
        executor.submit(2, [1, 2], SearchParams(min_span=1), shards=["no-such-shard"])
        executor.submit(3, [1, 99], SearchParams(min_span=1))
        executor.submit(4, [1, 2], SearchParams(min_span=1), timeout_s=0.0)
        outcomes = collect(executor, 4)
        (found,) = outcomes[1]
        assert found == ds.search([1, 2], SearchParams(min_span=1), shards=["shard-00001"])
        assert found.shard == "shard-00001" and found.searched_shards == ("shard-00001",)
        assert isinstance(outcomes[2], KeyError) and "no-such-shard" in str(outcomes[2])
        assert isinstance(outcomes[3], ValueError) and "99" in str(outcomes[3])
        assert isinstance(outcomes[4], TimeoutError)
    finally:
        executor.close()


def test_a_closed_executor_refuses_work_but_finishes_what_it_queued(corpus):
    ds, contexts = corpus
    executor = ds.search_executor(workers=2)
    for tag, context in enumerate(contexts):
        executor.submit(tag, context, PARAMS[0])
    executor.close()
    with pytest.raises(RuntimeError, match="closed"):
        executor.submit(999, [1], PARAMS[0])
    assert len(collect(executor, len(contexts))) == len(contexts)


def test_zero_workers_is_refused(corpus):
    with pytest.raises(ValueError, match="workers"):
        corpus[0].search_executor(workers=0)


def test_limits_too_large_for_the_clock_mean_no_limit(corpus):
    ds, contexts = corpus
    params = PARAMS[0]
    expected = ds.search_levels(contexts[0], params, 1)
    assert ds.try_search(contexts[0], params, None, time_limit_s=1e12) == expected
    executor = ds.search_executor(workers=1)
    try:
        executor.submit(1, contexts[0], params, timeout_s=1e30)
        executor.submit(2, contexts[0], params, timeout_s=float("inf"))
        outcomes = collect(executor, 2)
        assert outcomes[1] == outcomes[2] == expected
    finally:
        executor.close()


def test_levels_beyond_the_cap_are_refused(corpus):
    ds, contexts = corpus
    from rest.datastore import MAX_LEVELS

    for levels in (0, MAX_LEVELS + 1):
        with pytest.raises(ValueError, match="levels"):
            ds.search_levels(contexts[0], PARAMS[0], levels)
        with pytest.raises(ValueError, match="levels"):
            ds.try_search(contexts[0], PARAMS[0], None, 1.0, levels=levels)
    assert len(ds.search_levels([1, 2, 3, 4], SearchParams(min_span=1), MAX_LEVELS)) <= MAX_LEVELS
