"""Helpers for the retrieval-service tests.

Every server listens on 127.0.0.1 with a port the OS picks. Datastores are built by the real
engine from seeded random token documents; the only stand-in is ``GatedDatastore``, which wraps
the real datastore to hold searches at a gate so that "in flight" and "queued" can be arranged
deterministically (overload, deadlines).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rest.datastore import Datastore
from retriever_service import wire

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
USED_TOKENS = 24  # documents use ids 0..23, so 24..63 are in the vocabulary but never occur
SHARD_TOKENS = 6000


def random_documents(seed: int, n_docs: int = 80) -> list[list[int]]:
    """Documents over a small alphabet (so that suffixes recur), with some repeated phrases."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, USED_TOKENS, size=rng.integers(3, 12)).tolist() for _ in range(12)]
    docs = []
    for _ in range(n_docs):
        doc: list[int] = []
        target = rng.integers(40, 300)
        while len(doc) < target:
            if rng.random() < 0.4:
                doc += phrases[rng.integers(len(phrases))]
            else:
                doc += rng.integers(0, USED_TOKENS, size=rng.integers(1, 8)).tolist()
        docs.append(doc)
    return docs


def random_contexts(documents, n: int, seed: int) -> list[list[int]]:
    """Contexts cut from the documents (long matches) and random ones (short or no match)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(rng.integers(0, VOCAB, size=rng.integers(1, 40)).tolist())
        else:
            doc = documents[rng.integers(len(documents))]
            end = int(rng.integers(1, len(doc) + 1))
            out.append(doc[max(0, end - int(rng.integers(1, 40))) : end])
    return out


class GatedDatastore:
    """The real datastore, whose searches wait at ``gate`` and are counted.

    ``entered`` is released once per search that reached the engine call. Every search goes to
    the executor (``try_search`` never finishes in time), which runs it on Python threads so that
    it can wait at the gate: the server's path for a search that outlasts its inline slice.
    """

    def __init__(self, datastore: Datastore) -> None:
        self._datastore = datastore
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0
        self._lock = threading.Lock()
        self.shard_names = datastore.shard_names
        self.vocab_size = datastore.vocab_size

    def info(self):
        return self._datastore.info()

    def search_levels(self, context, params, levels, shards=None):
        """``(first level, levels)``: ``Datastore.search`` and ``Datastore.search_levels``."""
        with self._lock:
            self.calls += 1
        self.entered.release()
        assert self.gate.wait(20), "test gate never opened"
        return (self._datastore.search(context, params, shards=shards),
                self._datastore.search_levels(context, params, levels, shards=shards))

    def session(self):
        return None  # searches here are stateless; a session only makes them faster

    def try_search(self, context, params, shards, time_limit_s, *, levels=1, as_wire=False,
                   session=None):
        return None

    def search_executor(self, workers: int, *, as_wire: bool = False) -> ThreadSearchExecutor:
        return ThreadSearchExecutor(self, workers, as_wire)

    def wait_entered(self, n: int, timeout: float = 10.0) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=timeout), "search did not reach the engine"


class ThreadSearchExecutor:
    """``rest.datastore.SearchExecutor``'s interface on Python threads, for ``GatedDatastore``."""

    def __init__(self, datastore, workers: int, as_wire: bool) -> None:
        self._datastore = datastore
        self._as_wire = as_wire
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: list = []
        self._lock = threading.Lock()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        for _ in range(workers):
            threading.Thread(target=self._work, daemon=True).start()

    def submit(self, tag, context, params, shards=None, timeout_s=None, *, levels=1,
               session=None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._jobs.put((tag, list(context), params, shards, deadline, levels))

    def fileno(self) -> int:
        return self._wake_reader.fileno()

    def completed(self) -> list:
        try:
            while self._wake_reader.recv(256):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            done, self._done = self._done, []
        return done

    def cancel(self, tag) -> None:
        """The native executor gives a cancelled search up; these threads let it finish."""

    def close(self) -> None:
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            tag, context, params, shards, deadline, levels = job
            if deadline is not None and time.monotonic() >= deadline:
                outcome = TimeoutError("deadline passed before the search started; not searched")
            else:
                try:
                    first, found = self._datastore.search_levels(context, params, levels, shards)
                    outcome = found
                    if self._as_wire:
                        outcome = wire.search_response(first, found[1:]).SerializeToString()
                except Exception as exc:  # noqa: BLE001 - handed back like the native executor
                    outcome = exc
            with self._lock:
                self._done.append((tag, outcome))
            self._wake_writer.send(b"\x01")
        self._jobs.put(None)  # let the next worker stop too


def mangled(good: list[bytes], n: int, seed: int) -> list[bytes]:
    """``n`` of the messages ``good`` with 1 to 3 bytes changed, cut or added at random."""
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


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m retriever_service.server`` as a real subprocess on 127.0.0.1."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retriever_service.server", "--host", "127.0.0.1",
             "--port", "0", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )
        line = self.proc.stdout.readline()  # blocks until the server printed its address
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(match.group(1))
        self.address = f"127.0.0.1:{self.port}"
        self.search_address = None  # the native search port's (--search-port), on its own line
        if "--search-port" in args:
            line = self.proc.stdout.readline()
            match = re.search(r"native searches listening on 127\.0\.0\.1:(\d+)", line)
            if match is None:
                self.proc.kill()
                raise AssertionError(f"no search port: {line!r} {self.proc.stderr.read()}")
            self.search_address = f"127.0.0.1:{match.group(1)}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def output(self) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=30)
        return out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_certs_with_cryptography(out: Path) -> None:
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


def write_certs_with_openssl(out: Path) -> None:
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


class OtlpCollector:
    """A minimal OpenTelemetry collector on 127.0.0.1: OTLP traces over gRPC (``grpc_endpoint``)
    and over HTTP with protobuf bodies (``http_endpoint``), kept in ``spans``.

    ``with OtlpCollector() as collector: ... collector.spans`` (each a ``CollectedSpan``).
    """

    def __init__(self) -> None:
        from concurrent import futures
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import grpc
        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        self.spans: list[CollectedSpan] = []
        self._lock = threading.Lock()
        collector = self

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector._add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._grpc)
        grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        self.grpc_endpoint = f"http://127.0.0.1:{grpc_port}"

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    collector._add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # quiet
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.http_endpoint = f"http://127.0.0.1:{self._http.server_address[1]}"

    def _add(self, request) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    spans.append(CollectedSpan(
                        service=service, name=span.name, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex() or None,
                        attributes={a.key: a.value for a in span.attributes}))
        with self._lock:
            self.spans.extend(spans)

    def exporter_env(self, protocol: str) -> dict[str, str]:
        """The variables that make a process export its traces here, by ``protocol``."""
        endpoint = self.grpc_endpoint if protocol == "grpc" else self.http_endpoint
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "100"}

    def close(self) -> None:
        self._grpc.stop(0)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> OtlpCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str  # hex
    span_id: str
    parent_id: str | None
    attributes: dict
