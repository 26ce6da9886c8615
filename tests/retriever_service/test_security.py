"""TLS, mutual TLS and the bearer token, against a real server process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.client import RemoteRetriever, RetrieverUnavailable
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import ROOT, write_certs_with_openssl

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


def test_reflection_is_behind_the_token(datastore_dir, server_process):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = server_process("--datastore", str(datastore_dir), env={"REST_RETRIEVER_TOKEN": TOKEN})
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(server.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            next(reflection.ServerReflectionInfo(iter([listing]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = next(reflection.ServerReflectionInfo(
            iter([listing]), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert names == {"rest.retriever.v1.Retriever", "grpc.health.v1.Health",
                         "grpc.reflection.v1alpha.ServerReflection"}


def test_no_request_reads_a_path(datastore_dir, datastore, server_process):
    """The only string a request carries is a shard name, looked up among the served shards:
    paths, even of the datastore's own files, are unknown shards. Reflection answers from the
    compiled descriptors, never from files."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    string_fields = {
        (message.full_name, f.name)
        for message in (pb.SearchRequest.DESCRIPTOR, pb.InfoRequest.DESCRIPTOR,
                        pb.SearchParams.DESCRIPTOR)
        for f in message.fields if f.type == f.TYPE_STRING
    }
    assert string_fields == {("rest.retriever.v1.SearchRequest", "shard")}
    server = server_process("--datastore", str(datastore_dir))
    shard_file = next(p for p in datastore_dir.iterdir() if p.name != "manifest.json")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        for name in ("/etc/passwd", str(shard_file), f"../{datastore_dir.name}/{shard_file.name}",
                     shard_file.name, "manifest.json", f"{datastore.shard_names[0]}/../x"):
            with pytest.raises(grpc.RpcError) as info:
                stub.Search(pb.SearchRequest(context=[1], shard=name), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        for filename in ("/etc/passwd", str(datastore_dir / "manifest.json")):
            answer = next(reflection.ServerReflectionInfo(iter(
                [reflection_pb2.ServerReflectionRequest(file_by_filename=filename)]), timeout=10))
            assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
            assert not answer.file_descriptor_response.file_descriptor_proto


IDLE_SESSIONS = """
import asyncio, json, sys, grpc
from retriever_service.v1 import retriever_pb2 as pb, retriever_pb2_grpc as pb_grpc

address, pid, streams, channels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 10

def rss_mib():
    with open(f"/proc/{pid}/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS:")).split()[1]) / 1024

async def main():
    open_channels = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stub = pb_grpc.RetrieverStub(open_channels[0])
    await stub.Search(pb.SearchRequest(context=[1, 2]), timeout=10)  # warm
    before = rss_mib()
    calls = []
    for i in range(streams):
        call = pb_grpc.RetrieverStub(open_channels[i % channels]).SearchStream()
        await call.write(pb.SearchRequest(context=[1, 2, 3]))
        await call.read()
        calls.append(call)
    grown = rss_mib() - before
    # With all of them open, a new search is answered.
    answer = await stub.Search(pb.SearchRequest(context=[1, 2]), timeout=10)
    answer = answer.SerializeToString().hex()
    print(json.dumps({"before": before, "grown": grown, "answer": answer}))
    for call in calls:
        call.cancel()
    await asyncio.sleep(0.5)
    for channel in open_channels:
        await channel.close()

asyncio.run(main())
"""


def test_a_thousand_idle_streams_cost_bounded_memory(datastore_dir, datastore, server_process):
    """Sessions that opened a stream, searched once and went quiet: the server keeps answering,
    and holds them in a few tens of KiB each (measured about 23 MiB for 1,000). The sessions run
    in their own process: grpc.aio wants one event loop per process."""
    import json

    server = server_process("--datastore", str(datastore_dir))
    done = subprocess.run(
        [sys.executable, "-c", IDLE_SESSIONS, server.address, str(server.proc.pid), "1000"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    answer = pb.SearchResponse.FromString(bytes.fromhex(measured["answer"]))
    assert wire.search_result(answer) == datastore.search([1, 2])
    assert measured["grown"] < 64, f"1,000 idle streams grew the server by {measured['grown']} MiB"
    assert server.proc.poll() is None
