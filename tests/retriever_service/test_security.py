"""TLS, mutual TLS and the bearer token, against a real server process."""

from __future__ import annotations

import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.client import RemoteRetriever, RetrieverUnavailable
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import write_certs_with_openssl

TOKEN = "s3cret-token"


def test_openssl_fallback_makes_usable_certificates(tmp_path, datastore_dir, server_process):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    write_certs_with_openssl(tmp_path)
    server = server_process("--datastore", str(datastore_dir),
                            "--tls-cert", str(tmp_path / "server.pem"),
                            "--tls-key", str(tmp_path / "server.key"))
    with RemoteRetriever(server.address, tls_ca_file=tmp_path / "ca.pem") as retriever:
        assert retriever.info().vocab_size > 0


def test_tls_search_and_plaintext_refused(certs, datastore_dir, datastore, server_process):
    server = server_process("--datastore", str(datastore_dir),
                            "--tls-cert", str(certs / "server.pem"),
                            "--tls-key", str(certs / "server.key"))
    with RemoteRetriever(server.address, deadline_s=5, tls_ca_file=certs / "ca.pem") as retriever:
        assert retriever.info() == datastore.info()
        with retriever.session() as session:
            assert session.search([1, 2, 3], SearchParams()) == datastore.search([1, 2, 3])
    with RemoteRetriever(server.address, deadline_s=1.0) as plaintext:
        with plaintext.session() as session:
            assert session.search([1, 2, 3], SearchParams()) is None
            assert session.failures == 1


def test_mutual_tls_requires_a_client_certificate(certs, datastore_dir, datastore, server_process):
    server = server_process("--datastore", str(datastore_dir),
                            "--tls-cert", str(certs / "server.pem"),
                            "--tls-key", str(certs / "server.key"),
                            "--tls-client-ca", str(certs / "ca.pem"))
    with RemoteRetriever(server.address, deadline_s=5, tls_ca_file=certs / "ca.pem",
                         tls_cert_file=certs / "client.pem",
                         tls_key_file=certs / "client.key") as retriever:
        with retriever.session() as session:
            assert session.search([1, 2, 3], SearchParams()) == datastore.search([1, 2, 3])
    with RemoteRetriever(server.address, deadline_s=1.0, tls_ca_file=certs / "ca.pem") as anon:
        with anon.session() as session:
            assert session.search([1, 2, 3], SearchParams()) is None


def test_token_is_required_except_for_health(datastore_dir, datastore, server_process):
    server = server_process("--datastore", str(datastore_dir), env={"REST_RETRIEVER_TOKEN": TOKEN})
    request = wire.search_request([1, 2, 3], SearchParams())
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        calls = [
            lambda metadata: stub.Search(request, metadata=metadata, timeout=10),
            lambda metadata: stub.Info(pb.InfoRequest(), metadata=metadata, timeout=10),
            lambda metadata: next(stub.SearchStream(iter([request]), metadata=metadata,
                                                    timeout=10)),
        ]
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "Bearer" in info.value.details()
        good = (("authorization", f"Bearer {TOKEN}"),)
        assert wire.search_result(stub.Search(request, metadata=good)) == datastore.search(
            [1, 2, 3])
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.SERVING

    with RemoteRetriever(server.address, deadline_s=5, token=TOKEN) as retriever:
        assert retriever.info() == datastore.info()
        with retriever.session() as session:
            assert session.search([1, 2, 3], SearchParams()) == datastore.search([1, 2, 3])
    with RemoteRetriever(server.address, deadline_s=5, token="wrong") as retriever:
        with pytest.raises(RetrieverUnavailable, match="UNAUTHENTICATED"):
            retriever.info()
        with retriever.session() as session:
            assert session.search([1, 2, 3], SearchParams()) is None
            assert session.failures == 1


@pytest.mark.parametrize("token", ["", "  ", "tok\n", "two words"])
def test_clients_refuse_an_empty_or_unsendable_token(token):
    with pytest.raises(ValueError, match="token"):
        RemoteRetriever("127.0.0.1:1", token=token)


def test_the_server_refuses_an_empty_token_in_code_too(datastore_dir):
    from retriever_service.server import ServerConfig

    for token in ("", " "):
        with pytest.raises(ValueError, match="--token is empty"):
            ServerConfig(datastore=str(datastore_dir), token=token)
