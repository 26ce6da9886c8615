"""HealthWatch (gRPC A17): statuses as the server sets them, UNIMPLEMENTED as serving, errors as
not serving until the server is back, and a watch that stops when closed."""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health_pb2

from retriever_service.client import SERVICE_NAME
from retriever_service.health import Health, HealthWatch
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import free_port, wait_until


def watch(channel, name):
    seen = []
    w = HealthWatch(channel, name, lambda watch: seen.append(watch.status),
                    initial_backoff_s=0.05, max_backoff_s=0.2, label="test").start()
    return w, seen


def set_health(server, name, status):
    asyncio.run_coroutine_threadsafe(server.health.set(name, status), server._loop).result(10)


def test_statuses_follow_the_server_and_close_stops_the_watch(datastore, datastore_dir):
    with BackgroundServer(ServerConfig(datastore=str(datastore_dir), port=0), datastore) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        w, seen = watch(channel, SERVICE_NAME)
        shard, shard_seen = watch(channel, f"{SERVICE_NAME}/no-such-shard")
        assert wait_until(lambda: w.status is Health.SERVING)
        assert wait_until(lambda: shard.status is Health.SERVICE_UNKNOWN)
        set_health(server, SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert wait_until(lambda: w.status is Health.NOT_SERVING)
        set_health(server, SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        assert wait_until(lambda: w.status is Health.SERVING)
        assert seen == [Health.SERVING, Health.NOT_SERVING, Health.SERVING]
        w.close()
        shard.close()
        w._thread.join(5)
        assert not w._thread.is_alive()
        channel.close()


def test_a_server_without_health_service_counts_as_serving():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_RetrieverServicer_to_server(pb_grpc.RetrieverServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        w, _ = watch(channel, SERVICE_NAME)
        assert wait_until(lambda: w.status is Health.SERVING)
        w._thread.join(5)  # health checking is off for good: the watch ends
        assert not w._thread.is_alive()
        channel.close()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()


def test_a_server_that_goes_away_is_not_serving_until_it_is_back(datastore, datastore_dir):
    port = free_port()
    config = ServerConfig(datastore=str(datastore_dir), port=port)
    first = BackgroundServer(config, datastore)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    w, _ = watch(channel, SERVICE_NAME)
    try:
        assert wait_until(lambda: w.status is Health.SERVING)
        first.stop()
        assert wait_until(lambda: w.status is not Health.SERVING)
        with BackgroundServer(config, datastore):
            assert wait_until(lambda: w.status is Health.SERVING, timeout=10)
    finally:
        w.close()
        channel.close()
