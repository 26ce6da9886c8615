"""The native search port (``--search-port``): real server processes answer on it exactly as on
the Python port (the same bytes, the same refusals), and it keeps the server's rules: tokens,
deadlines, the concurrency limit, shards out of service, SIGTERM's drain."""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from rest.datastore import Datastore
from rest.types import SearchParams
from retriever_service import wire
from retriever_service.server import ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from tests.retriever_service.service_testing import ROOT, mangled, random_contexts, wait_until
from tests.retriever_service.test_native_wire import request_variants
from tests.retriever_service.test_shutdown import SLOW

SEARCH = "/rest.retriever.v1.Retriever/Search"
STREAM = "/rest.retriever.v1.Retriever/SearchStream"
INFO = "/rest.retriever.v1.Retriever/Info"
TOKEN = "s3cret-token"


def raw_call(channel, data: bytes, metadata=(), timeout=10.0):
    """``(bytes, None)`` or ``(None, (code, details))`` of one Search call with raw bytes."""
    try:
        return channel.unary_unary(SEARCH)(data, timeout=timeout, metadata=metadata), None
    except grpc.RpcError as exc:
        return None, (exc.code(), exc.details())


def raw_stream(channel, requests: list[bytes], metadata=()) -> list:
    """The answers of one SearchStream, and the error that ended it (if any)."""
    answers = []
    try:
        for answer in channel.stream_stream(STREAM)(iter(requests), timeout=30, metadata=metadata):
            answers.append(answer)
    except grpc.RpcError as exc:
        answers.append((exc.code(), exc.details()))
    return answers


@pytest.fixture
def both_ports(server_process, datastore_dir):
    server = server_process("--datastore", str(datastore_dir), "--search-port", "0",
                            "--max-context-tokens", "64")
    with grpc.insecure_channel(server.address) as python, \
            grpc.insecure_channel(server.search_address) as native:
        yield server, python, native


def test_search_answers_and_refusals_are_those_of_the_python_port(both_ports, datastore, documents):
    _, python, native = both_ports
    good, bad = request_variants(datastore, documents)
    requests = good + bad + mangled(good, 400, seed=7)
    requests.append(pb.SearchRequest(context=list(range(65))).SerializeToString())  # > 64 tokens
    answered = refused = 0
    for data in requests:
        expected = raw_call(python, data)
        assert raw_call(native, data) == expected, data
        answered += expected[1] is None
        refused += expected[1] is not None
    assert answered > 50 and refused > 50


def test_a_stream_answers_as_the_python_port(both_ports, datastore, documents):
    """A session's stream: contexts that extend each other, then one refused request."""
    _, python, native = both_ports
    document = max(documents, key=len)
    params = SearchParams(min_span=1, budget=32)
    requests = [wire.search_request(document[: 4 + i], params, levels=1 + i % 3).SerializeToString()
                for i in range(40)]
    requests.append(pb.SearchRequest(context=[]).SerializeToString())
    expected = raw_stream(python, requests)
    assert len(expected) == 41 and expected[-1][0] == grpc.StatusCode.INVALID_ARGUMENT
    assert raw_stream(native, requests) == expected


def test_info_advertises_the_search_port_on_both_ports(both_ports):
    server, python, native = both_ports
    port = int(server.search_address.rsplit(":", 1)[1])
    for channel in (python, native):
        info = pb.InfoResponse.FromString(channel.unary_unary(INFO)(b"", timeout=5))
        assert info.search_port == port
        assert list(info.shards)
    with pytest.raises(grpc.RpcError) as refused:
        native.unary_unary(INFO)(b"\xff\xff", timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_token_is_required_as_on_the_python_port(server_process, datastore_dir):
    server = server_process("--datastore", str(datastore_dir), "--search-port", "0",
                            env={"REST_RETRIEVER_TOKEN": TOKEN})
    data = pb.SearchRequest(context=[1, 2]).SerializeToString()
    with grpc.insecure_channel(server.address) as python, \
            grpc.insecure_channel(server.search_address) as native:
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            expected = raw_call(python, data, metadata)
            assert expected[1][0] == grpc.StatusCode.UNAUTHENTICATED
            assert raw_call(native, data, metadata) == expected
            assert raw_stream(native, [data], metadata) == [expected[1]]
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert raw_call(native, data, good) == raw_call(python, data, good)
        assert raw_call(native, data, good)[1] is None


@pytest.fixture
def slow_server(server_process, slow_datastore_dir):
    def start(*args: str):
        return server_process("--datastore", str(slow_datastore_dir), "--search-port", "0",
                              "--rest-max-budget", "4096", "--rest-max-depth", "256", *args)
    return start


def slow_search_s(slow_datastore_dir) -> float:
    started = time.perf_counter()
    Datastore.open(slow_datastore_dir).search([0, 0], SLOW)
    return time.perf_counter() - started


def test_a_deadline_that_passes_is_deadline_exceeded(slow_server, slow_datastore_dir):
    """The server gives the search up at the client's deadline (grpc-timeout), and counts it as
    a rejection for the deadline, as the Python port does."""
    import re

    slow_s = slow_search_s(slow_datastore_dir)
    server = slow_server("--metrics-port", "0", "--workers", "1")
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", server.proc.stdout.readline())
    data = wire.search_request([0, 0], SLOW).SerializeToString()
    with grpc.insecure_channel(server.search_address) as native:
        timeout = slow_s / 10
        _, error = raw_call(native, data, timeout=timeout)
        assert error[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        # Given up in the engine (one runtime thread): the next call is answered well before
        # the slow search would have finished.
        quick = pb.SearchRequest(context=[0, 0]).SerializeToString()
        assert wait_until(lambda: raw_call(native, quick)[1] is None, timeout=30)
    from tests.retriever_service.test_telemetry import scrape

    assert wait_until(lambda: any(
        s.labels["reason"] == "deadline" and s.value == 1
        for s in scrape(match.group(1)).get("rest_retriever_server_rejections", [])
        if s.name.endswith("_total")), timeout=slow_s * 2 + 5)


def test_searches_over_the_limit_are_resource_exhausted(slow_server, slow_datastore_dir):
    slow_s = slow_search_s(slow_datastore_dir)
    server = slow_server("--max-concurrent-searches", "1", "--workers", "2")
    data = wire.search_request([0, 0], SLOW).SerializeToString()
    with grpc.insecure_channel(server.search_address) as native:
        first = native.unary_unary(SEARCH).future(data, timeout=60)
        time.sleep(min(0.1, slow_s / 3))
        _, error = raw_call(native, data)
        assert not first.done()
        assert error == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "server busy: 1 searches in flight (limit 1); retry later or on another"
                         " replica")
        assert first.result(timeout=60)
        assert raw_call(native, data, timeout=60)[1] is None  # admitted again once it finished


def test_a_cancelled_stream_frees_its_place(slow_server, slow_datastore_dir):
    server = slow_server("--max-concurrent-searches", "1", "--workers", "2")
    slow = wire.search_request([0, 0], SLOW).SerializeToString()
    quick = pb.SearchRequest(context=[0, 0]).SerializeToString()
    with grpc.insecure_channel(server.search_address) as native:
        for _ in range(3):
            requests: queue.SimpleQueue = queue.SimpleQueue()
            stream = native.stream_stream(STREAM)(iter(requests.get, None), timeout=60)
            requests.put(quick)
            assert next(stream)
            requests.put(slow)
            stream.cancel()  # the client goes away, its stream open and a search running
        assert wait_until(lambda: raw_call(native, quick)[1] is None, timeout=30)


def test_sigterm_drains_the_search_port_then_exits_0(slow_server, slow_datastore_dir):
    slow_s = slow_search_s(slow_datastore_dir)
    server = slow_server("--workers", "2", "--grace-s", str(max(20.0, 20 * slow_s)))
    expected = Datastore.open(slow_datastore_dir).search([0, 0], SLOW)
    data = wire.search_request([0, 0], SLOW).SerializeToString()
    with grpc.insecure_channel(server.search_address) as native:
        in_flight = [native.unary_unary(SEARCH).future(data, timeout=120) for _ in range(2)]
        time.sleep(min(0.1, slow_s / 3))
        assert not any(f.done() for f in in_flight)
        server.terminate()
        for future in in_flight:
            answer = pb.SearchResponse.FromString(future.result(timeout=120))
            assert wire.search_result(answer) == expected
    with grpc.insecure_channel(server.search_address) as late:
        _, error = raw_call(late, data, timeout=5)
        assert error is not None and error[0] == grpc.StatusCode.UNAVAILABLE
    assert server.wait(timeout=60) == 0


def test_a_shard_out_of_service_is_out_of_service_on_the_search_port(
        server_process, datastore_dir, datastore, documents, tmp_path):
    import signal as signals

    copy = Path(shutil.copytree(datastore_dir, tmp_path / "ds"))
    names = datastore.shard_names
    damaged = names[1]
    server = server_process("--datastore", str(copy), "--search-port", "0")
    params = SearchParams(min_span=1, budget=32)
    contexts = random_contexts(documents, 10, seed=3)
    with grpc.insecure_channel(server.address) as python, \
            grpc.insecure_channel(server.search_address) as native:
        deadline = time.monotonic() + 15
        while subprocess.run(["truncate", "-s", "1000", str(copy / f"{damaged}.rds")],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        named = wire.search_request(contexts[0], params, shard=damaged).SerializeToString()
        assert wait_until(lambda: raw_call(python, named)[1] is not None, timeout=15)
        expected = raw_call(python, named)
        assert expected[1][0] == grpc.StatusCode.UNAVAILABLE
        assert raw_call(native, named) == expected
        for context in contexts:
            data = wire.search_request(context, params).SerializeToString()
            answer, error = raw_call(native, data)
            assert error is None and list(pb.SearchResponse.FromString(answer).searched_shards) \
                == [n for n in names if n != damaged]
            assert answer == raw_call(python, data)[0]
        # Whole again and reloaded (SIGHUP): the search port serves the new datastore too.
        shutil.copyfile(datastore_dir / f"{damaged}.rds", copy / f"{damaged}.rds")
        server.proc.send_signal(signals.SIGHUP)
        assert wait_until(lambda: raw_call(native, named)[1] is None, timeout=15)
        assert raw_call(native, named) == raw_call(python, named)
    server.terminate()
    assert server.wait(timeout=30) == 0


def test_the_search_port_must_differ_from_the_others():
    with pytest.raises(ValueError, match="--search-port must differ from --port"):
        ServerConfig(datastore="x", port=5000, search_port=5000)
    with pytest.raises(ValueError, match="--search-port must differ from --health-port"):
        ServerConfig(datastore="x", port=0, health_port=5001, search_port=5001)


def tls_channel(address: str, certs: Path, client: bool = False) -> grpc.Channel:
    keys = {}
    if client:
        keys = {"private_key": (certs / "client.key").read_bytes(),
                "certificate_chain": (certs / "client.pem").read_bytes()}
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes(), **keys)
    return grpc.secure_channel(address, credentials)


def test_the_search_port_uses_the_servers_tls(server_process, datastore_dir, certs):
    server = server_process("--datastore", str(datastore_dir), "--search-port", "0",
                            "--tls-cert", str(certs / "server.pem"),
                            "--tls-key", str(certs / "server.key"))
    data = pb.SearchRequest(context=[1, 2, 3]).SerializeToString()
    with tls_channel(server.address, certs) as python, \
            tls_channel(server.search_address, certs) as native:
        expected = raw_call(python, data)
        assert expected[1] is None and raw_call(native, data) == expected
    with grpc.insecure_channel(server.search_address) as plaintext:
        _, error = raw_call(plaintext, data, timeout=5)
        assert error is not None and error[0] == grpc.StatusCode.UNAVAILABLE


def test_the_search_port_requires_client_certificates_with_a_client_ca(
        server_process, datastore_dir, certs):
    server = server_process("--datastore", str(datastore_dir), "--search-port", "0",
                            "--tls-cert", str(certs / "server.pem"),
                            "--tls-key", str(certs / "server.key"),
                            "--tls-client-ca", str(certs / "ca.pem"))
    data = pb.SearchRequest(context=[1, 2, 3]).SerializeToString()
    with tls_channel(server.search_address, certs, client=True) as native:
        assert raw_call(native, data)[1] is None
    with tls_channel(server.search_address, certs) as anonymous:
        _, error = raw_call(anonymous, data, timeout=5)
        assert error is not None and error[0] == grpc.StatusCode.UNAVAILABLE


def test_the_search_ports_searches_feed_the_servers_metrics(server_process, datastore_dir,
                                                            monkeypatch):
    import re

    from retriever_service.telemetry import LATENCY_BUCKETS_S
    from tests.retriever_service.test_telemetry import scrape

    for name in list(__import__("os").environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    server = server_process("--datastore", str(datastore_dir), "--search-port", "0",
                            "--metrics-port", "0", "--max-concurrent-searches", "1")
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", server.proc.stdout.readline())
    assert match
    good = pb.SearchRequest(context=[1, 2, 3]).SerializeToString()
    with grpc.insecure_channel(server.address) as python, \
            grpc.insecure_channel(server.search_address) as native:
        assert raw_call(python, good)[1] is None
        for _ in range(2):
            assert raw_call(native, good)[1] is None
        assert raw_stream(native, [good, good]) == [raw_call(python, good)[0]] * 2
        assert raw_call(native, pb.SearchRequest(context=[1, 10_000]).SerializeToString())[1]
    families = scrape(match.group(1))
    requests = {s.labels["rpc_method"]: s.value for s in families["rest_retriever_server_requests"]
                if s.name.endswith("_total")}
    # Search: 2 on the Python port, 3 on the native one.
    assert requests == {"Search": 5, "SearchStream": 2}
    errors = {s.labels["error"]: s.value for s in families["rest_retriever_server_errors"]
              if s.name.endswith("_total")}
    assert errors["INVALID_ARGUMENT"] == 1
    latency = [s for s in families["rest_retriever_server_search_port_duration_seconds"]
               if s.name.endswith("_bucket") and s.labels["outcome"] == "ok"
               and s.labels["rpc_method"] == "Search"]
    assert [float(s.labels["le"]) for s in latency] == [*LATENCY_BUCKETS_S, float("inf")]
    assert latency[-1].value == 2
    (in_flight,) = families["rest_retriever_server_searches_in_flight"]
    assert in_flight.value == 0
    server.terminate()
    assert server.wait() == 0


def test_a_request_over_the_message_limit_is_refused_as_on_the_python_port(
        server_process, datastore_dir):
    server = server_process("--datastore", str(datastore_dir), "--search-port", "0",
                            "--max-message-bytes", "1024")
    large = pb.SearchRequest(context=[1] * 2000).SerializeToString()
    with grpc.insecure_channel(server.address) as python, \
            grpc.insecure_channel(server.search_address) as native:
        expected = raw_call(python, large)
        assert expected[1][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = raw_call(native, large)
        assert got[1][0] == expected[1][0]
        # grpc core words it with or without "SERVER: " from one call to the next.
        assert got[1][1].removeprefix("SERVER: ") == expected[1][1].removeprefix("SERVER: ")


def test_a_traced_server_opens_no_search_port(datastore, datastore_dir, caplog):
    from opentelemetry.sdk.trace import TracerProvider

    from retriever_service.server import BackgroundServer

    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    with BackgroundServer(config, datastore, tracer_provider=TracerProvider()) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert server.search_port is None
        info = pb.InfoResponse.FromString(channel.unary_unary(INFO)(b"", timeout=5))
        assert info.search_port == 0
    assert any("not opened on a traced server" in r.getMessage() for r in caplog.records)


def test_an_in_process_server_serves_and_stops_its_search_port(datastore, datastore_dir):
    from retriever_service.server import BackgroundServer

    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    data = pb.SearchRequest(context=[1, 2, 3]).SerializeToString()
    with BackgroundServer(config, datastore) as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as python, \
                grpc.insecure_channel(f"127.0.0.1:{server.search_port}") as native:
            assert raw_call(native, data) == raw_call(python, data)
    with grpc.insecure_channel(f"127.0.0.1:{server.search_port}") as gone:
        assert raw_call(gone, data, timeout=2)[1][0] == grpc.StatusCode.UNAVAILABLE
