"""The search port (``retriever-server --search-port``): Search and SearchStream served by the
engine's own gRPC server must answer and refuse exactly as the main port does, with its token,
deadlines, limit, reloads and shards out of service, and drain on SIGTERM."""

from __future__ import annotations

import queue
import random
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rest.datastore import Datastore
from rest.types import SearchParams
from retriever_service import wire
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from tests.retriever_service.service_testing import ROOT, random_contexts
from tests.retriever_service.test_native_wire import request_variants
from tests.retriever_service.test_telemetry import metric_points

SEARCH = "/rest.retriever.v1.Retriever/Search"
STREAM = "/rest.retriever.v1.Retriever/SearchStream"
INFO = "/rest.retriever.v1.Retriever/Info"
# As in test_shutdown: a REST-policy search of tenths of a second on the slow datastore.
SLOW = SearchParams(min_span=2, max_span=2, budget=4096, max_depth=256, policy="rest")


def outcome(channel: grpc.Channel, request: bytes, *, method: str = SEARCH, timeout: float = 30,
            metadata=None):
    """``("ok", response bytes)`` or ``(status code, details)``."""
    try:
        return "ok", channel.unary_unary(method)(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


def stream_outcomes(channel: grpc.Channel, requests: list[bytes]) -> list:
    """The responses of one SearchStream carrying ``requests``, then its status if not OK."""
    call = channel.stream_stream(STREAM)(iter(requests), timeout=30)
    got = []
    try:
        got.extend(call)
    except grpc.RpcError as exc:
        got.append((exc.code(), exc.details()))
    return got


def mangled(good: list[bytes], n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = bytearray(rng.choice(good))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            kind = rng.randrange(3)
            if kind == 0:
                data[i] = rng.randrange(256)
            elif kind == 1:
                del data[i]
            else:
                data.insert(i, rng.randrange(256))
        out.append(bytes(data))
    return out


def channels(server) -> tuple[grpc.Channel, grpc.Channel]:
    return (grpc.insecure_channel(f"127.0.0.1:{server.port}"),
            grpc.insecure_channel(f"127.0.0.1:{server.search_port}"))


def test_info_advertises_the_port_and_both_ports_answer_every_request_alike(
        datastore, datastore_dir, documents):
    """Accepted, refused and 600 mangled requests, unary and streamed: the same bytes, or the
    same status and message, on both ports."""
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0,
                          max_context_tokens=64)
    with BackgroundServer(config, datastore) as server:
        main, port = channels(server)
        info = pb.InfoResponse.FromString(outcome(main, b"", method=INFO)[1])
        assert info.search_port == server.search_port != 0
        good, bad = request_variants(datastore, documents)
        requests = good + bad + mangled(good, 600, seed=7)
        kinds = set()
        for data in requests:
            expected = outcome(main, data)
            assert outcome(port, data) == expected, data
            kinds.add(expected[0])
        assert {"ok", grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= kinds
        # A stream: one answer per request in order, and the first refusal ends it alike.
        contexts = random_contexts(documents, 30, seed=8)
        steps = [wire.search_request(c, SearchParams(), levels=3).SerializeToString()
                 for c in contexts]
        assert stream_outcomes(port, steps) == stream_outcomes(main, steps)
        assert len(stream_outcomes(port, steps)) == len(steps)
        broken = steps[:5] + [bad[0]] + steps[5:]
        assert stream_outcomes(port, broken) == stream_outcomes(main, broken)
        assert stream_outcomes(port, broken)[-1][0] == grpc.StatusCode.INVALID_ARGUMENT
        # What the main port alone serves is refused clearly.
        code, details = outcome(port, b"", method=INFO)
        assert code == grpc.StatusCode.UNIMPLEMENTED and "main port" in details


def test_the_token_is_required_on_the_search_port(datastore, datastore_dir, documents):
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0, token="s3cret")
    request = wire.search_request(random_contexts(documents, 1, seed=2)[0],
                                  SearchParams()).SerializeToString()
    with BackgroundServer(config, datastore) as server:
        main, port = channels(server)
        for metadata in (None, (("authorization", "Bearer wrong"),),
                         (("authorization", "s3cret"),)):
            expected = outcome(main, request, metadata=metadata)
            assert expected[0] == grpc.StatusCode.UNAUTHENTICATED
            assert outcome(port, request, metadata=metadata) == expected
        good = (("authorization", "Bearer s3cret"),)
        assert outcome(port, request, metadata=good) == outcome(main, request, metadata=good)
        assert outcome(port, request, metadata=good)[0] == "ok"


def test_deadlines_and_the_concurrency_limit(slow_datastore_dir):
    datastore = Datastore.open(slow_datastore_dir)
    config = ServerConfig(datastore=str(slow_datastore_dir), port=0, search_port=0,
                          max_concurrent_searches=1, workers=2, rest_max_budget=4096,
                          rest_max_depth=256)
    slow = wire.search_request([0, 0], SLOW).SerializeToString()
    quick = wire.search_request([0, 0, 0], SearchParams()).SerializeToString()
    with BackgroundServer(config, datastore) as server:
        _, port = channels(server)
        started = time.perf_counter()
        assert outcome(port, slow)[0] == "ok"
        slow_s = time.perf_counter() - started
        # A deadline shorter than the search: DEADLINE_EXCEEDED, and the port goes on serving.
        assert outcome(port, slow, timeout=slow_s / 10)[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert outcome(port, quick)[0] == "ok"
        # Three at once with a limit of one search in flight: the others are refused at once.
        calls = [port.unary_unary(SEARCH).future(slow, timeout=60) for _ in range(3)]
        results = []
        for call in calls:
            try:
                results.append(("ok", call.result()))
            except grpc.RpcError as exc:
                results.append((exc.code(), exc.details()))
        busy = [r for r in results if r[0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert busy and len(busy) < 3, results
        assert re.fullmatch(r"server busy: 1 searches in flight \(limit 1\); retry later or on"
                            r" another replica", busy[0][1])


def test_reload_and_a_shard_out_of_service(datastore_dir, documents):
    datastore = Datastore.open(datastore_dir)  # its own: a shard is taken out of service
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    context = random_contexts(documents, 1, seed=4)[0]
    shard = datastore.shard_names[1]
    named = wire.search_request(context, SearchParams(), shard=shard).SerializeToString()
    with BackgroundServer(config, datastore) as server:
        main, port = channels(server)
        assert outcome(port, named) == outcome(main, named)
        assert outcome(port, named)[0] == "ok"
        datastore.take_out_of_service(shard, "failed a test's check")
        refused = outcome(main, named)
        assert refused[0] == grpc.StatusCode.UNAVAILABLE
        assert outcome(port, named) == refused
        server.reload()  # reopened from its files: the shard serves again, on both ports
        assert outcome(port, named)[0] == "ok"
        assert outcome(port, named) == outcome(main, named)


def test_the_search_port_is_counted_in_the_servers_metrics(datastore, datastore_dir, documents):
    reader = InMemoryMetricReader()
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    good = wire.search_request(random_contexts(documents, 1, seed=5)[0],
                               SearchParams()).SerializeToString()
    with BackgroundServer(config, datastore,
                          meter_provider=MeterProvider(metric_readers=[reader])) as server:
        _, port = channels(server)
        for _ in range(3):
            assert outcome(port, good)[0] == "ok"
        assert outcome(port, pb.SearchRequest(context=[]).SerializeToString())[0] == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert len(stream_outcomes(port, [good, good])) == 2
        points = metric_points(reader)["rest.retriever.server.search_port.requests"]
        counts = {(p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p.value
                  for p in points}
        assert counts == {("Search", 0): 3, ("Search", 3): 1, ("SearchStream", 0): 1}


def test_options_that_cannot_work_are_refused_in_one_line(datastore_dir, certs):
    with pytest.raises(ValueError, match="plaintext only"):
        ServerConfig(datastore=str(datastore_dir), search_port=0,
                     tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    with pytest.raises(ValueError, match="must differ"):
        ServerConfig(datastore=str(datastore_dir), port=5000, search_port=5000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore_dir),
             "--port", "0", "--search-port", str(busy)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--search-port {busy} is in use" in lines[0], proc.stderr


def test_sigterm_drains_the_search_port_and_exits_0(server_process, slow_datastore_dir):
    started = time.perf_counter()
    expected = Datastore.open(slow_datastore_dir).search([0, 0], SLOW)
    slow_s = time.perf_counter() - started
    server = server_process("--datastore", str(slow_datastore_dir), "--workers", "2",
                            "--search-port", "0", "--grace-s", str(max(20.0, 20 * slow_s)),
                            "--rest-max-budget", "4096", "--rest-max-depth", "256")
    line = server.proc.stdout.readline()
    match = re.search(r"search port on 127\.0\.0\.1:(\d+)", line)
    assert match, line
    with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as port:
        requests: queue.SimpleQueue = queue.SimpleQueue()
        stream = port.stream_stream(STREAM)(iter(requests.get, None))
        requests.put(wire.search_request([0, 0], SearchParams()).SerializeToString())
        assert wire.search_result(pb.SearchResponse.FromString(next(stream))).match_length == 2
        slow = wire.search_request([0, 0], SLOW).SerializeToString()
        in_flight = [port.unary_unary(SEARCH).future(slow, timeout=120) for _ in range(2)]
        time.sleep(min(0.1, slow_s / 3))
        assert not any(f.done() for f in in_flight)
        server.terminate()
        for future in in_flight:  # finished with their full answers
            assert wire.search_result(pb.SearchResponse.FromString(future.result())) == expected
        requests.put(wire.search_request([0, 0, 0], SearchParams()).SerializeToString())
        assert wire.search_result(pb.SearchResponse.FromString(next(stream))).match_length == 3
        requests.put(None)
        assert list(stream) == []
    assert server.wait(timeout=60) == 0
    with grpc.insecure_channel(f"127.0.0.1:{match.group(1)}") as again:  # nothing listens
        assert outcome(again, slow, timeout=2)[0] == grpc.StatusCode.UNAVAILABLE
