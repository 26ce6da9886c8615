"""The server, in-process on a loopback port: answers, refusals, deadlines, overload, health."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import VOCAB, GatedDatastore, random_contexts


# The server tries a search on its event loop for a short slice before handing it to the native
# executor; 0 sends every search to the executor. Both paths must give the engine's answers.
@pytest.fixture(scope="module", params=[200, 0], ids=["inline-slice", "executor-only"])
def server(request, datastore, datastore_dir):
    config = ServerConfig(datastore=str(datastore_dir), port=0, max_context_tokens=64,
                          inline_search_us=request.param)
    with BackgroundServer(config, datastore) as running:
        yield running


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.RetrieverStub(channel)


def gated_server(datastore, datastore_dir, **options) -> tuple[BackgroundServer, GatedDatastore]:
    gated = GatedDatastore(datastore)
    config = ServerConfig(datastore=str(datastore_dir), port=0, **options)
    return BackgroundServer(config, gated), gated


PARAM_CASES = [
    SearchParams(),
    SearchParams(min_span=1, max_span=4, budget=8, max_depth=3),
    SearchParams(min_span=3, max_span=30, budget=200, max_depth=20),
    SearchParams(budget=0),
    SearchParams(policy="rest"),
    SearchParams(min_span=1, budget=16, max_depth=4, policy="rest"),
]


def test_info_is_the_datastore_metadata(stub, datastore):
    assert wire.datastore_info(stub.Info(pb.InfoRequest())) == datastore.info()


@pytest.mark.parametrize("params", PARAM_CASES, ids=repr)
def test_search_equals_the_in_process_engine(stub, datastore, documents, params):
    for context in random_contexts(documents, 40, seed=hash(params) % 1000):
        response = stub.Search(wire.search_request(context, params))
        assert wire.search_result(response) == datastore.search(context, params), context


@pytest.mark.parametrize("params", PARAM_CASES, ids=repr)
def test_search_stream_equals_the_in_process_engine_in_order(stub, datastore, documents, params):
    contexts = random_contexts(documents, 60, seed=5)
    requests = [wire.search_request(c, params) for c in contexts]
    responses = list(stub.SearchStream(iter(requests), timeout=30))
    assert len(responses) == len(contexts)  # one response per request, in order
    for context, response in zip(contexts, responses):
        assert wire.search_result(response) == datastore.search(context, params), context


def test_full_context_is_answered_like_its_tail(stub, datastore, documents):
    # The server (and the client) may drop all but the last max_span tokens.
    context = next(d for d in documents if len(d) >= 60)[:60]  # > max_span, < the limit
    request = pb.SearchRequest(context=context, params=wire.params_to_wire(SearchParams()))
    assert wire.search_result(stub.Search(request)) == datastore.search(context)


def test_a_named_shard_is_searched_alone(stub, datastore, documents):
    for shard in datastore.shard_names:
        for context in random_contexts(documents, 10, seed=3):
            request = wire.search_request(context, SearchParams(), shard=shard)
            expected = datastore.search(context, SearchParams(), shards=[shard])
            assert wire.search_result(stub.Search(request)) == expected
            assert expected.shard == shard


@pytest.mark.parametrize(
    ("request_fields", "code", "field_name"),
    [
        ({"context": []}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"context": [1] * 65}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"context": [1, VOCAB]}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"context": [1, 2**32 - 1]}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
        ({"context": [1], "params": pb.SearchParams(min_span=0)},
         grpc.StatusCode.INVALID_ARGUMENT, "params.min_span"),
        ({"context": [1], "params": pb.SearchParams(max_span=300)},
         grpc.StatusCode.INVALID_ARGUMENT, "params.max_span"),
        ({"context": [1], "params": pb.SearchParams(min_span=4, max_span=2)},
         grpc.StatusCode.INVALID_ARGUMENT, "params.max_span"),
        ({"context": [1], "params": pb.SearchParams(budget=10_000)},
         grpc.StatusCode.INVALID_ARGUMENT, "params.budget"),
        ({"context": [1], "params": pb.SearchParams(max_depth=0)},
         grpc.StatusCode.INVALID_ARGUMENT, "params.max_depth"),
        ({"context": [1], "params": pb.SearchParams(policy=3)},
         grpc.StatusCode.INVALID_ARGUMENT, "params.policy"),
        ({"context": [1], "shard": "shard-99999"}, grpc.StatusCode.NOT_FOUND, "shard"),
    ],
)
def test_refusals_name_the_field(stub, request_fields, code, field_name):
    request = pb.SearchRequest(**request_fields)
    with pytest.raises(grpc.RpcError) as unary:
        stub.Search(request)
    assert unary.value.code() == code
    assert unary.value.details().startswith(field_name), unary.value.details()
    # On a stream, the refusal ends the stream with the same status.
    good = wire.search_request([1, 2], SearchParams())
    responses = stub.SearchStream(iter([good, request, good]), timeout=10)
    assert next(responses).match_length >= 0
    with pytest.raises(grpc.RpcError) as stream:
        next(responses)
    assert stream.value.code() == code
    assert stream.value.details().startswith(field_name)


def test_messages_over_the_size_limit_are_refused(datastore, datastore_dir):
    config = ServerConfig(datastore=str(datastore_dir), port=0, max_message_bytes=1024,
                          max_context_tokens=100_000)
    with BackgroundServer(config, datastore) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(pb.SearchRequest(context=[1] * 2000))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Search(pb.SearchRequest(context=[1] * 10)).match_length >= 0


def test_overload_is_resource_exhausted(datastore, datastore_dir):
    server, gated = gated_server(datastore, datastore_dir, max_concurrent_searches=2, workers=2)
    with server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        request = wire.search_request([1, 2, 3], SearchParams())
        in_flight = [stub.Search.future(request, timeout=30) for _ in range(2)]
        gated.wait_entered(2)  # both searches are running: the limit is reached
        with pytest.raises(grpc.RpcError) as unary:
            stub.Search(request, timeout=10)
        assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit 2" in unary.value.details()
        with pytest.raises(grpc.RpcError) as stream:
            next(stub.SearchStream(iter([request]), timeout=10))
        assert stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gated.gate.set()
        expected = datastore.search([1, 2, 3])
        assert [wire.search_result(f.result()) for f in in_flight] == [expected, expected]
        assert wire.search_result(stub.Search(request, timeout=10)) == expected  # limit freed
        assert gated.calls == 3  # the refused searches never reached the engine


def test_a_search_whose_deadline_passed_while_queued_is_not_done(datastore, datastore_dir):
    # One worker: the second call waits behind the first, held at the gate, past its deadline.
    server, gated = gated_server(datastore, datastore_dir, max_concurrent_searches=8, workers=1)
    with server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        request = wire.search_request([4, 5], SearchParams())
        first = stub.Search.future(request, timeout=30)
        gated.wait_entered(1)
        late = stub.Search.future(request, timeout=0.3)
        assert late.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gated.gate.set()
        first.result()
        # The worker is first-in first-out: once a later call is answered, the late one was
        # taken off the queue, and it must have been skipped.
        stub.Search(request, timeout=10)
        assert gated.calls == 2


def test_a_stream_past_its_deadline_is_deadline_exceeded(datastore, datastore_dir):
    server, gated = gated_server(datastore, datastore_dir, workers=1)
    with server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        requests: queue.SimpleQueue = queue.SimpleQueue()
        responses = stub.SearchStream(iter(requests.get, None), timeout=0.3)
        requests.put(wire.search_request([4, 5], SearchParams()))
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        requests.put(None)
        gated.gate.set()


def test_health_is_serving_and_reflection_lists_the_service(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rest.retriever.v1.Retriever"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter(
            [reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"rest.retriever.v1.Retriever", "grpc.health.v1.Health"} <= names


def test_concurrent_streams_each_get_their_own_answers(stub, datastore, documents):
    contexts = random_contexts(documents, 30, seed=11)
    errors: list[BaseException] = []

    def run(offset: int) -> None:
        try:
            mine = contexts[offset:] + contexts[:offset]
            responses = stub.SearchStream(iter(wire.search_request(c, SearchParams())
                                               for c in mine), timeout=30)
            for context, response in zip(mine, responses):
                assert wire.search_result(response) == datastore.search(context)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_ipv6_hosts_get_brackets_in_addresses():
    from retriever_service.server import host_for_address

    assert host_for_address("::1") == "[::1]"
    assert host_for_address("[::1]") == "[::1]"
    assert host_for_address("127.0.0.1") == "127.0.0.1"


def test_a_port_in_use_is_an_error_that_says_so(server, datastore, datastore_dir):
    config = ServerConfig(datastore=str(datastore_dir), port=server.port)
    with pytest.raises(OSError, match=f"--port {server.port} is in use"):
        BackgroundServer(config, datastore)


# Bytes that are not a SearchRequest: a truncated varint, a field with a wire type that does not
# match its declaration (context as a fixed64), a length prefix past the end, an invalid tag.
MALFORMED = [b"\x08\xff\xff\xff", b"\x09\x00", b"\x0a\x05\x01", b"\x00", b"\xff\xff\xff\xff\xff"]


@pytest.mark.parametrize("method", ["Search", "SearchStream", "Info"])
@pytest.mark.parametrize("payload", MALFORMED, ids=lambda p: p.hex())
def test_a_malformed_message_is_invalid_argument(server, method, payload):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        path = f"/rest.retriever.v1.Retriever/{method}"
        with pytest.raises(grpc.RpcError) as info:
            if method == "SearchStream":  # raw bytes both ways: no (de)serializer
                next(channel.stream_stream(path)(iter([payload]), timeout=10))
            else:
                channel.unary_unary(path)(payload, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details().startswith("request: ")
        # The server goes on answering well-formed requests.
        assert pb_grpc.RetrieverStub(channel).Search(pb.SearchRequest(context=[1])).ByteSize() >= 0


def test_a_huge_shard_name_is_echoed_in_part_and_stays_not_found(stub, datastore):
    name = "x" * 16_384
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(pb.SearchRequest(context=[1], shard=name), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    details = info.value.details()
    assert len(details) < 300, details
    assert "16384 characters" in details
    assert datastore.shard_names[0] in details
