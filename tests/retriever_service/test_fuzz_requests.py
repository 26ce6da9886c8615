"""Fuzzing the server's requests: random and mutated ``SearchRequest`` bytes and fields.

Whatever arrives, the answer is either the in-process engine's for that request, or a refusal
with the status its first bad field calls for (INVALID_ARGUMENT, NOT_FOUND) and a short message;
never UNKNOWN or INTERNAL, never a crash. The servicer is driven directly for many examples (no
network: fast), then the real server through gRPC for fewer. Bounded for CI: set
``REST_FUZZ_EXAMPLES`` (default 300; the wire test runs a fifth of it) for longer runs. Inputs
found interesting are kept below as ``@example`` regression cases.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.searches import AsyncSearches
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.servicer import RetrieverServicer
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.validation import DEFAULT_POLICY_CAPS, MAX_MESSAGE_CHARS
from tests.retriever_service.service_testing import USED_TOKENS, VOCAB

EXAMPLES = int(os.environ.get("REST_FUZZ_EXAMPLES", "300"))
MAX_CONTEXT = 64
UINT32 = 2**32 - 1
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# What a message may start with for each refused field, and the status it gets.
FIELD_CODES = {"context": grpc.StatusCode.INVALID_ARGUMENT,
               "params.": grpc.StatusCode.INVALID_ARGUMENT,
               "levels": grpc.StatusCode.INVALID_ARGUMENT,
               "request: ": grpc.StatusCode.INVALID_ARGUMENT,
               "shard": grpc.StatusCode.NOT_FOUND}


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message


class FakeContext:
    """What the servicer uses of ``grpc.aio.ServicerContext``: abort raises, as grpc's does."""

    def time_remaining(self):
        return None

    async def abort(self, code, message):
        raise Aborted(code, message)


@pytest.fixture(scope="module")
def servicer_loop(datastore):
    loop = asyncio.new_event_loop()

    async def make() -> tuple[RetrieverServicer, AsyncSearches]:
        searches = AsyncSearches(datastore.search_executor(2, as_wire=True))
        servicer = RetrieverServicer(datastore, searches, max_concurrent_searches=64,
                                     max_context_tokens=MAX_CONTEXT, inline_search_s=200e-6)
        return servicer, searches

    servicer, searches = loop.run_until_complete(make())
    yield servicer, loop
    searches.close()
    loop.close()


# --- what arrives ---------------------------------------------------------------------------

def token_ids() -> st.SearchStrategy[int]:
    # Mostly tokens that occur (long matches), some in the vocabulary that never occur, and a
    # few outside it, up to the largest uint32.
    return st.one_of(st.integers(0, USED_TOKENS - 1), st.integers(0, VOCAB - 1),
                     st.integers(VOCAB, UINT32))


def optional_uint32(typical: int) -> st.SearchStrategy[int | None]:
    return st.one_of(st.none(), st.integers(0, typical), st.integers(0, UINT32))


@st.composite
def search_requests(draw, shard_names) -> pb.SearchRequest:
    request = pb.SearchRequest(context=draw(st.lists(token_ids(), max_size=MAX_CONTEXT + 4)))
    if draw(st.booleans()):
        params = pb.SearchParams(policy=draw(st.one_of(st.integers(0, 2),
                                                       st.integers(-2**31, 2**31 - 1))))
        for name, typical in (("min_span", 8), ("max_span", 300), ("budget", 5000),
                              ("max_depth", 300)):
            value = draw(optional_uint32(typical))
            if value is not None:
                setattr(params, name, value)
        request.params.CopyFrom(params)
    shard = draw(st.one_of(st.none(), st.sampled_from(shard_names), st.text(max_size=40),
                           st.text(min_size=2000, max_size=3000)))
    if shard is not None:
        request.shard = shard
    levels = draw(st.one_of(st.none(), st.integers(0, 20), st.integers(0, UINT32)))
    if levels is not None:
        request.levels = levels
    return request


@st.composite
def mutated_bytes(draw, shard_names) -> bytes:
    data = bytearray(draw(search_requests(shard_names)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del data[at:]
        else:  # a repeated message: protobuf merges it (later scalars win, repeated fields add)
            data.extend(bytes(data))
    return bytes(data)


def request_bytes(shard_names) -> st.SearchStrategy[bytes]:
    return st.one_of(
        search_requests(shard_names).map(lambda r: r.SerializeToString()),
        mutated_bytes(shard_names),
        st.binary(max_size=200),
    )


# --- what must come back --------------------------------------------------------------------

def refused_fields(request: pb.SearchRequest, shard_names) -> set[str]:
    """The prefixes of every refusal the request deserves (the server reports one of them)."""
    bad = set()
    context = list(request.context)
    if not context or len(context) > MAX_CONTEXT or max(context) >= VOCAB:
        bad.add("context")
    if request.HasField("shard") and request.shard not in shard_names:
        bad.add("shard")
    try:
        expected_params(request)
    except ValueError:
        bad.add("params.")
    return bad


def expected_params(request: pb.SearchRequest) -> SearchParams:
    wire_params = request.params
    policy = wire.POLICY_FROM_WIRE.get(wire_params.policy)
    if policy is None:
        raise ValueError("policy")
    given = {name: getattr(wire_params, name) for name in wire.PARAM_FIELDS
             if wire_params.HasField(name)}
    params = SearchParams(**given, policy=policy)
    caps = dict(DEFAULT_POLICY_CAPS)[policy]  # the server's own bounds on the work of a search
    if params.budget > caps.max_budget or params.max_depth > caps.max_depth:
        raise ValueError("over this server's caps")
    return params


def check_answer(datastore, data: bytes, outcome) -> None:
    """``outcome``: the response bytes, or ``(code, message)`` of a refusal."""
    try:
        request = pb.SearchRequest.FromString(data)
    except Exception:  # noqa: BLE001 - whatever protobuf raises for bytes it cannot parse
        request = None
    shard_names = list(datastore.shard_names)
    if isinstance(outcome, bytes):
        assert request is not None, "bytes that do not parse were answered"
        assert not refused_fields(request, shard_names), (request, "answered")
        params = expected_params(request)
        shards = [request.shard] if request.HasField("shard") else None
        expected = datastore.search(list(request.context)[-params.max_span:], params,
                                    shards=shards)
        assert wire.search_result(pb.SearchResponse.FromString(outcome)) == expected
        return
    code, message = outcome
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), message
    assert len(message) <= MAX_MESSAGE_CHARS
    prefix = next((p for p in FIELD_CODES if message.startswith(p)), None)
    assert prefix is not None, message
    assert code == FIELD_CODES[prefix], (code, message)
    if request is None:
        assert prefix == "request: ", message
    elif prefix == "levels":
        # Back-off levels: the server caps them; any other refusal is one the request deserves.
        assert request.HasField("levels") and request.levels != 1, message
    else:
        assert prefix in refused_fields(request, shard_names), (message, request)


def regression_examples(test):
    """Inputs kept from fuzzing and from the reports that started it."""
    cases = [
        b"",  # all defaults: an empty context
        b"\x0a\x05\x01",  # a packed context whose length runs past the end
        b"\x08\xff\xff\xff",  # an unfinished varint
        b"\x09\x00",  # context as a fixed64: the wrong wire type
        b"\x00",  # field number 0
        pb.SearchRequest(context=[1], shard="x" * 16_384).SerializeToString(),
        pb.SearchRequest(context=[1, UINT32]).SerializeToString(),
        pb.SearchRequest(context=[1], params=pb.SearchParams(policy=-1)).SerializeToString(),
        pb.SearchRequest(context=[1], params=pb.SearchParams(budget=UINT32)).SerializeToString(),
        pb.SearchRequest(context=[1], levels=0).SerializeToString(),
        pb.SearchRequest(context=[1], levels=UINT32).SerializeToString(),
        # The same field twice, packed then unpacked: protobuf concatenates them.
        b"\x0a\x02\x01\x02" + b"\x08\x03",
        # Found by this test: within the protocol's range, over the server's cap for the policy.
        b"\x12\x04 A(\x02",
        # A request merged with itself: context doubled, later scalars win.
        pb.SearchRequest(context=[1, 2], shard="shard-00000").SerializeToString() * 2,
    ]
    for case in cases:
        test = example(case)(test)
    return test


@SETTINGS
@given(data=st.data())
def test_servicer_answers_or_refuses_every_request_as_it_deserves(servicer_loop, datastore,
                                                                  data):
    servicer, loop = servicer_loop
    payload = data.draw(request_bytes(list(datastore.shard_names)))
    run_servicer(servicer, loop, datastore, payload)


@SETTINGS
@regression_examples
@given(payload=st.just(b"\x0a\x01"))
def test_regression_cases(servicer_loop, datastore, payload):
    servicer, loop = servicer_loop
    run_servicer(servicer, loop, datastore, payload)


def run_servicer(servicer, loop, datastore, payload: bytes) -> None:
    try:
        outcome = loop.run_until_complete(servicer.Search(payload, FakeContext()))
    except Aborted as refused:
        outcome = (refused.code, refused.message)
    check_answer(datastore, payload, outcome)


WIRE_SETTINGS = settings(SETTINGS, max_examples=max(10, EXAMPLES // 5))


@pytest.fixture(scope="module")
def wire_server(datastore, datastore_dir):
    config = ServerConfig(datastore=str(datastore_dir), port=0, max_context_tokens=MAX_CONTEXT)
    with BackgroundServer(config, datastore) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@WIRE_SETTINGS
@given(data=st.data())
def test_the_server_answers_raw_bytes_on_unary_calls_and_streams(wire_server, datastore, data):
    names = list(datastore.shard_names)
    payloads = data.draw(st.lists(request_bytes(names), min_size=1, max_size=3))
    unary = wire_server.unary_unary("/rest.retriever.v1.Retriever/Search")
    for payload in payloads:
        try:
            outcome = unary(payload, timeout=10)
        except grpc.RpcError as exc:
            outcome = (exc.code(), exc.details())
        check_answer(datastore, payload, outcome)
    # On a stream: answers in order until the first refusal, which ends the stream with it.
    stream = wire_server.stream_stream("/rest.retriever.v1.Retriever/SearchStream")
    responses = stream(iter(payloads), timeout=10)
    for payload in payloads:
        try:
            outcome = next(responses)
        except grpc.RpcError as exc:
            check_answer(datastore, payload, (exc.code(), exc.details()))
            break
        check_answer(datastore, payload, outcome)
    # The server is still well: a plain search is answered.
    good = wire.search_request([1, 2, 3], SearchParams()).SerializeToString()
    assert wire.search_result(pb.SearchResponse.FromString(unary(good, timeout=10))) == \
        datastore.search([1, 2, 3])
