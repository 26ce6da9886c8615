"""TLS, mutual TLS and the bearer token, against a real server process."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.client import RemoteRetriever, RetrieverUnavailable
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"


def _write_certs_with_cryptography(out: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem: str, key, cert) -> None:
        (out / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn, key, issuer_name, issuer_key, *, ca=False, san=None, usage=None):
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("test-ca", ca_key, name("test-ca"), ca_key, ca=True)
    save("ca", ca_key, ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    save("server", server_key, issue(
        "localhost", server_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    client_key = ec.generate_private_key(ec.SECP256R1())
    save("client", client_key, issue(
        "test-client", client_key, ca.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH))


def _write_certs_with_openssl(out: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=out, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    for stem, cn, ext in [
        ("server", "localhost",
         "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "test-client", "extendedKeyUsage=clientAuth\n"),
    ]:
        (out / f"{stem}.ext").write_text(ext)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.pem", "-days", "1", "-extfile", f"{stem}.ext")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A test CA, a server certificate for 127.0.0.1, and a client certificate."""
    out = tmp_path_factory.mktemp("certs")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("needs the cryptography package or the openssl command")
        _write_certs_with_openssl(out)
    else:
        _write_certs_with_cryptography(out)
    return out


def test_openssl_fallback_makes_usable_certificates(tmp_path, datastore_dir, server_process):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    _write_certs_with_openssl(tmp_path)
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
