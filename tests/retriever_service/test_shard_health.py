"""Shard files changed under a running server: real processes truncate, copy over and rewrite
them; the server lives, takes that shard out of service (health, one log line, UNAVAILABLE),
serves its other shards, and serves the shard again after SIGHUP. Also --verify, the scrub, the
caps per policy and searches given up when their call goes away."""

from __future__ import annotations

import shutil
import signal
from dataclasses import replace
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rest.datastore import Datastore
from rest.types import SearchParams
from retriever_service import wire
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import random_contexts, wait_until

SERVICE = "rest.retriever.v1.Retriever"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PARAMS = SearchParams(min_span=1, budget=32)


@pytest.fixture
def copy_dir(datastore_dir, tmp_path) -> Path:
    """A copy of the test datastore that a test may damage."""
    return Path(shutil.copytree(datastore_dir, tmp_path / "ds"))


def health_of(channel, name: str):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status


def wait_health(channel, name: str, status) -> bool:
    return wait_until(lambda: health_of(channel, name) == status, timeout=15)


def like_an_operator(*command: str) -> None:
    """Runs ``command`` until it succeeds: a read lease makes an O_NONBLOCK open for writing
    (coreutils ``truncate``) fail with EAGAIN once while the server lets the file go."""
    deadline = time.monotonic() + 15
    while subprocess.run(command, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"{command} kept failing"
        time.sleep(0.02)


def search(stub, context, shard=None):
    return stub.Search(wire.search_request(context, PARAMS, shard=shard), timeout=10)


def shard_file(directory: Path, shard: str) -> Path:
    return directory / f"{shard}.rds"


@pytest.mark.parametrize("change", ["truncate", "copy-over"])
def test_a_shard_changed_under_the_server_goes_out_of_service_alone(
    server_process, copy_dir, datastore, documents, change
):
    names = datastore.shard_names
    damaged, others = names[1], [names[0], *names[2:]]
    server = server_process("--datastore", str(copy_dir))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for name in ["", SERVICE, *(f"{SERVICE}/{n}" for n in names)]:
            assert health_of(channel, name) == SERVING
        contexts = random_contexts(documents, 20, seed=3)
        for context in contexts[:5]:
            assert wire.search_result(search(stub, context)) == datastore.search(context, PARAMS)

        if change == "truncate":
            like_an_operator("truncate", "-s", "1000", str(shard_file(copy_dir, damaged)))
        else:
            like_an_operator("cp", str(shard_file(copy_dir, names[0])),
                             str(shard_file(copy_dir, damaged)))
        assert wait_health(channel, f"{SERVICE}/{damaged}", NOT_SERVING)
        assert server.proc.poll() is None  # alive
        for name in ["", SERVICE, *(f"{SERVICE}/{n}" for n in others)]:
            assert health_of(channel, name) == SERVING

        # A search naming the shard: UNAVAILABLE, with the reason.
        with pytest.raises(grpc.RpcError) as refused:
            search(stub, contexts[0], shard=damaged)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"shard {damaged!r}".replace("'", '"') in refused.value.details()
        assert "out of service" in refused.value.details()
        # A search over every shard covers the others, and says so.
        for context in contexts:
            response = search(stub, context)
            assert list(response.searched_shards) == others
            expected = datastore.search(context, PARAMS, shards=others)
            assert wire.search_result(response) == replace(expected, shard="")

        # Whole again (a copy of the original file) and a reload: served again.
        shutil.copyfile(datastore.path / f"{damaged}.rds", shard_file(copy_dir, damaged))
        server.proc.send_signal(signal.SIGHUP)
        assert wait_health(channel, f"{SERVICE}/{damaged}", SERVING)
        for context in contexts[:5]:
            response = search(stub, context)
            assert list(response.searched_shards) == names
            assert wire.search_result(response) == datastore.search(context, PARAMS)
    server.terminate()
    assert server.wait() == 0
    _, err = server.output()
    lines = [line for line in err.splitlines() if "out of service" in line]
    assert len(lines) == 1, err  # one line, naming the shard, its file and what changed
    assert damaged in lines[0] and str(shard_file(copy_dir, damaged)) in lines[0]
    assert ("lease" in lines[0] or "truncated" in lines[0] or "written" in lines[0]), lines[0]
    assert "reloaded" in err


def test_verify_keeps_a_corrupt_shard_out_of_service_from_the_start(server_process, copy_dir,
                                                                    datastore):
    names = datastore.shard_names
    corrupt = shard_file(copy_dir, names[2])
    data = bytearray(corrupt.read_bytes())
    data[600] ^= 0xFF  # a token: the header and its checksum stay valid
    corrupt.write_bytes(bytes(data))

    # Without --verify (and without the scrub, which would find it within moments): not noticed.
    plain = server_process("--datastore", str(copy_dir), "--scrub-mib-per-s", "0")
    with grpc.insecure_channel(plain.address) as channel:
        assert health_of(channel, f"{SERVICE}/{names[2]}") == SERVING
    plain.kill()

    server = server_process("--datastore", str(copy_dir), "--verify")
    with grpc.insecure_channel(server.address) as channel:
        assert health_of(channel, f"{SERVICE}/{names[2]}") == NOT_SERVING
        assert health_of(channel, f"{SERVICE}/{names[0]}") == SERVING
        assert health_of(channel, "") == SERVING
        with pytest.raises(grpc.RpcError) as refused:
            search(pb_grpc.RetrieverStub(channel), [1, 2], shard=names[2])
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed --verify" in refused.value.details()
    server.terminate()
    server.wait()
    _, err = server.output()
    lines = [line for line in err.splitlines() if "out of service" in line]
    assert len(lines) == 1 and "checksum mismatch in tokens" in lines[0], err


def test_a_server_with_no_shard_that_opens_refuses_to_start(copy_dir, datastore):
    for name in datastore.shard_names:
        shard_file(copy_dir, name).write_bytes(b"not a shard")
    done = subprocess.run(
        [*server_command(), "--datastore", str(copy_dir)], capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no shard is in service" in done.stderr and "truncated" in done.stderr


def server_command() -> list[str]:
    import sys

    return [sys.executable, "-m", "retriever_service.server", "--port", "0"]


def test_the_scrub_takes_a_shard_changed_in_place_out_of_service(copy_dir, datastore):
    # Without leases or inotify (as on a network file system written from elsewhere), only the
    # scrub can see bytes changed in place.
    unwatched = Datastore.open(copy_dir, leases=False, inotify=False)
    config = ServerConfig(datastore=str(copy_dir), port=0, scrub_mib_per_s=64)
    with BackgroundServer(config, unwatched) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        name = datastore.shard_names[0]
        subprocess.run(["dd", "if=/dev/urandom", f"of={shard_file(copy_dir, name)}", "bs=1",
                        "seek=700", "count=8", "conv=notrunc", "status=none"], check=True)
        assert wait_health(channel, f"{SERVICE}/{name}", NOT_SERVING)
        assert "modified in place" in unwatched.shard_states()[name]
        assert health_of(channel, "") == SERVING


def test_search_parameters_above_the_policy_caps_are_refused(datastore, datastore_dir):
    config = ServerConfig(datastore=str(datastore_dir), port=0, rest_max_budget=100,
                          rest_max_depth=8)
    with BackgroundServer(config, datastore) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for params, field, option in [
            (SearchParams(policy="rest", budget=101), "params.budget", "--rest-max-budget"),
            (SearchParams(policy="rest", max_depth=9), "params.max_depth", "--rest-max-depth"),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(wire.search_request([1, 2], params), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith(field) and option in refused.value.details()
        # At the caps, and the exact policy beyond them: answered.
        stub.Search(wire.search_request([1, 2], SearchParams(policy="rest", budget=100,
                                                             max_depth=8)), timeout=10)
        stub.Search(wire.search_request([1, 2], SearchParams(budget=4096, max_depth=256)),
                    timeout=10)


SLOW = SearchParams(min_span=2, max_span=2, budget=4096, max_depth=256, policy="rest")


@pytest.mark.parametrize("how", ["deadline", "cancel"])
def test_a_search_whose_call_is_gone_stops_in_the_engine(slow_datastore_dir, how):
    """One worker and eight slow searches whose calls go away (deadline passed, or cancelled by
    the client): were they run to completion, an ordinary search would wait for all eight."""
    slow = Datastore.open(slow_datastore_dir)
    started = time.perf_counter()
    slow.search([0, 0], SLOW)
    slow_s = time.perf_counter() - started
    config = ServerConfig(datastore=str(slow_datastore_dir), port=0, workers=1,
                          rest_max_budget=4096, rest_max_depth=256)
    with BackgroundServer(config, slow) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        request = wire.search_request([0, 0], SLOW)
        if how == "deadline":
            calls = [stub.Search.future(request, timeout=0.05) for _ in range(8)]
            for call in calls:
                assert call.exception(timeout=30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            calls = [stub.Search.future(request) for _ in range(8)]
            time.sleep(0.05)
            for call in calls:
                call.cancel()
        started = time.perf_counter()
        stub.Search(wire.search_request([0, 0], SearchParams()), timeout=60)
        waited = time.perf_counter() - started
    assert waited < 3 * slow_s, f"an ordinary search waited {waited:.2f} s; one slow search" \
                                f" takes {slow_s:.2f} s"
