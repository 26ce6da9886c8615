"""The engine encodes the server's SearchResponse itself (retriever_rs/python/src/wire.rs): its
bytes must be exactly what the generated Python message serializes to, for every kind of tree."""

import select
import time

import pytest

from rest.types import SearchParams, SearchResult
from retriever_service import wire
from retriever_service.v1 import retriever_pb2 as pb
from tests.retriever_service.service_testing import mangled, random_contexts

PARAMS = [
    SearchParams(),
    SearchParams(min_span=1, max_span=4, budget=200, max_depth=20),  # deep trees, large counts
    SearchParams(budget=0),  # a match and no tree
    SearchParams(min_span=1, budget=16, policy="rest"),
]


def python_encoding(result) -> bytes:
    return wire.search_response(result).SerializeToString()


@pytest.mark.parametrize("params", PARAMS, ids=repr)
def test_try_search_bytes_are_the_python_message(datastore, documents, params):
    for i, context in enumerate(random_contexts(documents, 60, seed=11)):
        shards = [datastore.shard_names[i % 3]] if i % 2 else None
        encoded = datastore.try_search(context, params, shards, 10.0, as_wire=True)
        expected = datastore.search(context, params, shards=shards)
        assert encoded == python_encoding(expected), context
        assert wire.search_result(pb.SearchResponse.FromString(encoded)) == expected
        assert wire.decode_response(encoded)[0] == [expected]  # the client's single-level decoding


@pytest.mark.parametrize("params", PARAMS, ids=repr)
def test_levels_bytes_are_the_python_message(datastore, documents, params):
    """Every back-off level in `backoff`, with and without a session."""
    session = datastore.session()
    for i, context in enumerate(random_contexts(documents, 60, seed=13)):
        shards = [datastore.shard_names[i % 3]] if i % 2 else None
        levels = 1 + i % 4
        first = datastore.search(context, params, shards=shards)
        backoff = datastore.search_levels(context, params, levels, shards=shards)[1:]
        expected = wire.search_response(first, backoff).SerializeToString()
        for in_session in (None, session):
            encoded = datastore.try_search(context, params, shards, 10.0, levels=levels,
                                           as_wire=True, session=in_session)
            assert encoded == expected, context
        response = pb.SearchResponse.FromString(encoded)
        assert wire.search_levels_result(response) == ([first, *backoff] if first.match_length else [])
        # The engine's decoding of the same bytes: the same results, field for field.
        assert wire.decode_levels(encoded) == (wire.search_levels_result(response),
                                               tuple(response.searched_shards))
        assert list(response.searched_shards) == list(shards or datastore.shard_names)


@pytest.mark.parametrize("params", PARAMS, ids=repr)
def test_executor_bytes_are_the_python_message(datastore, documents, params):
    contexts = random_contexts(documents, 60, seed=12)
    executor = datastore.search_executor(2, as_wire=True)
    try:
        for tag, context in enumerate(contexts):
            executor.submit(tag, context, params, shards=["shard-00001"] if tag % 2 else None)
        outcomes = {}
        deadline = time.monotonic() + 20
        while len(outcomes) < len(contexts):
            assert select.select([executor.fileno()], [], [], deadline - time.monotonic())[0]
            outcomes.update(executor.completed())
        for tag, context in enumerate(contexts):
            expected = datastore.search(context, params,
                                        shards=["shard-00001"] if tag % 2 else None)
            assert outcomes[tag] == python_encoding(expected), context
    finally:
        executor.close()


def test_cached_wire_params_are_copied_into_requests():
    """wire.params_to_wire caches one message per SearchParams; protobuf copies a submessage
    given to a constructor, so a request changed later leaves the cached message alone."""
    params = SearchParams(budget=7)
    request = wire.search_request([1, 2, 3], params)
    request.params.budget = 99
    assert wire.params_to_wire(params).budget == 7
    assert wire.search_request([1, 2, 3], params).params.budget == 7


def test_levels_survive_the_wire():
    """Every field of every back-off level, and the shard fields, come back as they were sent."""
    first = SearchResult(5, 9, (1, 2), (-1, 0), (9, 4), shard="a,b", cut_count=3,
                         searched_shards=("a", "b"))
    second = SearchResult(4, 12, (1,), (-1,), (12,), shard="a,b", cut_count=0,
                          searched_shards=("a", "b"))
    response = pb.SearchResponse.FromString(
        wire.search_levels_response([first, second]).SerializeToString())
    assert wire.search_levels_result(response) == [first, second]
    assert wire.search_result(response) == first
    assert wire.search_levels_result(wire.search_levels_response([])) == []
    data = wire.search_levels_response([first, second]).SerializeToString()
    assert wire.decode_levels(data) == ([first, second], ("a", "b"))
    assert wire.decode_response(data) == ([first, second], ("a", "b"))
    assert wire.decode_levels(wire.search_levels_response([]).SerializeToString()) == ([], ())


def test_the_engine_refuses_bytes_that_are_not_a_search_response():
    with pytest.raises(ValueError, match="not a SearchResponse"):
        wire.decode_response(b"\xff\xff\xff")


def test_requests_carry_levels_only_when_asked():
    assert not wire.search_request([1, 2], SearchParams()).HasField("levels")
    assert wire.search_request([1, 2], SearchParams(), levels=3).levels == 3


def request_variants(datastore, documents):
    """Requests the parser accepts and requests it refuses, each as bytes."""
    contexts = random_contexts(documents, 12, seed=17)
    good = []
    for i, context in enumerate(contexts):
        for params in PARAMS:
            shard = datastore.shard_names[i % 3] if i % 2 else None
            good.append(wire.search_request(context, params, levels=1 + i % 4, shard=shard))
    good.append(pb.SearchRequest(context=contexts[0]))  # no params, no levels: the defaults
    good.append(pb.SearchRequest(context=contexts[0], params=pb.SearchParams(policy=pb.POLICY_EXACT)))
    bad = [
        pb.SearchRequest(),  # no context
        pb.SearchRequest(context=[1] * 5000),  # over the context limit
        pb.SearchRequest(context=[1, 10**6]),  # outside the vocabulary
        pb.SearchRequest(context=[1, 2], shard="no-such-shard"),
        pb.SearchRequest(context=[1, 2], levels=0),
        pb.SearchRequest(context=[1, 2], levels=17),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(policy=7)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(min_span=0)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(min_span=5, max_span=4)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(max_span=257)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(budget=4097)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(max_depth=0)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(max_depth=257)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(budget=1025, policy=pb.POLICY_REST)),
        pb.SearchRequest(context=[1, 2], params=pb.SearchParams(max_depth=65, policy=pb.POLICY_REST)),
    ]
    traced = pb.SearchRequest(context=[1, 2])
    traced.trace_context["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    return ([m.SerializeToString() for m in good],
            [m.SerializeToString() for m in bad] + [b"\xff\xff", traced.SerializeToString()])


def test_the_engines_request_checks_answer_as_the_python_parser(datastore, documents):
    """``try_search_request`` answers every request the parser accepts with the bytes of the
    Python path (decode, parse, try_search), and leaves every request it refuses (or whose trace
    context the server reads in Python) to the parser: None, never an answer."""
    from retriever_service.validation import RequestError, RequestLimits, SearchRequestParser, decode

    parser = SearchRequestParser(RequestLimits(
        vocab_size=datastore.info().vocab_size, max_context_tokens=4096,
        shards=tuple(datastore.shard_names)))
    limits = parser.limits.for_engine()
    good, bad = request_variants(datastore, documents)
    for data in good:
        parsed = parser.parse(decode(pb.SearchRequest, data))
        expected = datastore.try_search(parsed.context, parsed.params, parsed.shards, 10.0,
                                        levels=parsed.levels, as_wire=True)
        assert datastore.try_search_request(data, limits, 10.0, None) == expected, data
        assert datastore.try_search_request(data, limits, 10.0, 5.0,
                                            session=datastore.session()) == expected, data
    for data in bad:
        if not data.startswith(b"\xff") and data != bad[-1]:
            with pytest.raises(RequestError):
                parser.parse(decode(pb.SearchRequest, data))
        assert datastore.try_search_request(data, limits, 10.0, None) is None, data


def test_a_request_checked_in_the_engine_runs_out_of_its_slice(datastore, documents):
    """No time left: False (checked, not searched to the end), never a partial answer."""
    from retriever_service.validation import RequestLimits, SearchRequestParser

    parser = SearchRequestParser(RequestLimits(
        vocab_size=datastore.info().vocab_size, max_context_tokens=4096,
        shards=tuple(datastore.shard_names)))
    data = wire.search_request(random_contexts(documents, 1, seed=3)[0], SearchParams(),
                               levels=3).SerializeToString()
    assert datastore.try_search_request(data, parser.limits.for_engine(), 0.0, None) is False
    assert datastore.try_search_request(data, parser.limits.for_engine(), 1.0, 0.0) is False


def test_the_engine_accepts_no_mangled_request_that_the_parser_refuses(datastore, documents):
    """Valid requests with bytes changed, cut or added at random: whatever the engine's checks
    accept, the parser accepts too, and the answers are the same bytes."""
    from retriever_service.validation import RequestError, RequestLimits, SearchRequestParser, decode

    parser = SearchRequestParser(RequestLimits(
        vocab_size=datastore.info().vocab_size, max_context_tokens=64,
        shards=tuple(datastore.shard_names)))
    limits = parser.limits.for_engine()
    good, _ = request_variants(datastore, documents)
    accepted = refused = 0
    for data in mangled(good, 3000, seed=5):
        answer = datastore.try_search_request(data, limits, 10.0, None)
        if answer is None:
            refused += 1
            continue
        accepted += 1
        try:
            parsed = parser.parse(decode(pb.SearchRequest, data))
        except RequestError as exc:
            raise AssertionError(f"the engine accepted {data!r}, the parser refused it: {exc}")
        assert answer == datastore.try_search(parsed.context, parsed.params, parsed.shards, 10.0,
                                              levels=parsed.levels, as_wire=True), data
    assert accepted > 100 and refused > 100  # both sides of the checks were exercised
