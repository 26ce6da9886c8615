"""retriever-server --health-port: the health service alone, in plaintext, beside a TLS port."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retriever_service.server import SERVICE_NAME, BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc


def health(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_the_health_port_answers_in_plaintext_and_serves_nothing_else(datastore_dir, certs):
    config = ServerConfig(datastore=str(datastore_dir), port=0, health_port=0,
                          tls_cert=str(certs / "server.pem"), tls_key=str(certs / "server.key"))
    server = BackgroundServer(config)
    try:
        assert server.health_port not in (None, 0, server.port)
        assert health(server.health_port) == health_pb2.HealthCheckResponse.SERVING
        assert health(server.health_port, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.RetrieverStub(channel).Info(pb.InfoRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The main port speaks TLS only: a plaintext health check there fails.
        with pytest.raises(grpc.RpcError):
            health(server.port)
    finally:
        server.stop()


def test_shutdown_turns_the_health_port_not_serving_first(datastore_dir):
    server = BackgroundServer(ServerConfig(datastore=str(datastore_dir), port=0, health_port=0))
    port = server.health_port
    server._call(server._running.health.enter_graceful_shutdown())
    assert health(port) == health_pb2.HealthCheckResponse.NOT_SERVING
    server.stop()


def test_the_health_port_must_differ_from_the_port(datastore_dir):
    with pytest.raises(ValueError, match="--health-port must differ from --port"):
        ServerConfig(datastore=str(datastore_dir), port=50051, health_port=50051)
    with pytest.raises(ValueError, match="--health-port must be in 0..65535"):
        ServerConfig(datastore=str(datastore_dir), health_port=70000)
