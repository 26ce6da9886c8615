"""A real ``retriever-server`` process: SIGTERM drains calls in flight and exits 0."""

from __future__ import annotations

import queue
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rest.datastore import Datastore
from rest.types import SearchParams
from retriever_service import wire
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import ROOT

# On the slow datastore this search counts 5,000 continuations 256 tokens deep: it takes long
# enough (tenths of a second) to be reliably running when the signal arrives (above the server's
# default caps for the REST policy, which the test raises).
SLOW = SearchParams(min_span=2, max_span=2, budget=4096, max_depth=256, policy="rest")


def test_sigterm_finishes_calls_in_flight_then_exits_0(server_process, slow_datastore_dir):
    started = time.perf_counter()
    expected = Datastore.open(slow_datastore_dir).search([0, 0], SLOW)
    slow_s = time.perf_counter() - started
    server = server_process("--datastore", str(slow_datastore_dir), "--workers", "2",
                            "--grace-s", str(max(20.0, 20 * slow_s)),
                            "--rest-max-budget", "4096", "--rest-max-depth", "256")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

        # A session's stream, open across the signal, and slow unary searches running at it.
        requests: queue.SimpleQueue = queue.SimpleQueue()
        stream = stub.SearchStream(iter(requests.get, None))
        requests.put(wire.search_request([0, 0], SearchParams()))
        assert next(stream).match_length == 2
        slow_request = wire.search_request([0, 0], SLOW)
        in_flight = [stub.Search.future(slow_request, timeout=120) for _ in range(4)]
        time.sleep(min(0.1, slow_s / 3))  # sent and picked up; the first two are searching

        assert not any(f.done() for f in in_flight)  # still running when the signal comes
        server.terminate()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()

        # Calls that were in flight complete with their full answers...
        for future in in_flight:
            assert wire.search_result(future.result(timeout=120)) == expected
        # ...the open stream still answers during the grace period...
        requests.put(wire.search_request([0, 0, 0], SearchParams()))
        assert next(stream).match_length == 3
        requests.put(None)  # the session ends its stream
        assert list(stream) == []
        # ...and new calls are refused.
        try:
            stub.Search(wire.search_request([0, 0], SearchParams()), timeout=5)
            refused = None
        except grpc.RpcError as exc:
            refused = exc.code()
        assert refused == grpc.StatusCode.UNAVAILABLE

    assert server.wait(timeout=60) == 0
    out, err = server.output()
    assert "shutting down" in err and "stopped" in err


def test_sigterm_when_idle_exits_0_quickly(server_process, datastore_dir):
    server = server_process("--datastore", str(datastore_dir), "--grace-s", "30")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        assert stub.Search(wire.search_request([1, 2], SearchParams())).match_length >= 0
    started = time.monotonic()
    server.terminate()
    assert server.wait(timeout=30) == 0
    assert time.monotonic() - started < 10  # nothing in flight: no waiting for the grace period


def test_unknown_shard_on_the_command_line_fails_with_a_message(datastore_dir):
    done = subprocess.run(
        [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore_dir),
         "--shard", "shard-12345", "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode != 0
    assert "shard-12345" in done.stderr


def test_port_0_prints_the_bound_port_and_serves_only_the_named_shards(
    server_process, datastore_dir, datastore
):
    names = datastore.shard_names[:2]
    server = server_process("--datastore", str(datastore_dir), "--shard", names[0],
                            "--shard", names[1])
    assert server.port > 0
    with grpc.insecure_channel(server.address) as channel:
        info = wire.datastore_info(pb_grpc.RetrieverStub(channel).Info(pb.InfoRequest()))
    assert info.shards == tuple(names)
    server.terminate()
    assert server.wait() == 0



def test_the_click_command_is_exposed_for_rest_serve():
    import click
    from click.testing import CliRunner

    from retriever_service.server import serve_command

    assert isinstance(serve_command, click.Command)
    result = CliRunner().invoke(serve_command, ["--help"])
    assert result.exit_code == 0
    for option in ("--datastore", "--shard", "--host", "--port", "--max-concurrent-searches",
                   "--max-message-bytes", "--keepalive-time-s", "--grace-s", "--tls-cert",
                   "--tls-client-ca", "--token", "--max-context-tokens", "--workers",
                   "--metrics-port", "--metrics-host"):
        assert option in result.output
