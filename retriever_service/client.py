"""``RemoteRetriever``: ``rest.retriever.Retriever`` over one or more retrieval servers.

    with RemoteRetriever("10.0.0.5:50051", deadline_s=0.05) as retriever:
        assert retriever.info().tokenizer_fingerprint == my_fingerprint
        with retriever.session() as session:          # one per generation
            result = session.search(context, params)  # None: no draft this step

A session keeps one ``SearchStream`` per endpoint for its whole life, so a decoding step costs one
message each way instead of a new call. Every search has its own deadline; a search that fails or
is late returns ``None`` ("no draft": the decoder takes a plain step, the output is unchanged),
counts the failure, and drops the session's streams, which the next search opens again.

Several endpoints are several hosts serving different shards of one datastore: every search goes
to all of them at once and the answers are merged (``retriever_service.merge``).

The client uses gRPC's blocking API, not ``grpc.aio``: ``grpc.aio`` supports one event loop per
process, and a library that ran its own loop in a thread would collide with an application's (or a
test's in-process server's). A blocking stream read has no timeout of its own, so a per-retriever
watchdog thread cancels the streams of a search that outlives its deadline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from rest.retriever import RetrievalSession, Retriever, RetrieverUnavailable
from rest.types import DatastoreInfo, SearchParams, SearchResult
from retriever_service import wire
from retriever_service.auth import bearer_metadata
from retriever_service.merge import merge_results
from retriever_service.telemetry import INSTRUMENTATION_NAME, SearchTelemetry
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc

log = logging.getLogger("retriever_service.client")

STREAM_METHOD = "/rest.retriever.v1.Retriever/SearchStream"
MiB = 1 << 20


class IncompatibleEndpoints(ValueError):
    """The endpoints do not serve disjoint shards of one datastore."""


class RemoteRetriever(Retriever):
    """Retrieval from ``retriever-server`` endpoints (``"host:port"``, one or several).

    ``deadline_s`` bounds each search, from the call to the merged answer. ``token`` is sent as
    ``authorization: Bearer <token>``. TLS is used when ``tls`` is true or any ``tls_*`` file is
    given: ``tls_ca_file`` to trust the server's certificate (default: the system's roots),
    ``tls_cert_file``/``tls_key_file`` for mutual TLS, ``tls_server_name`` when the certificate's
    name differs from the endpoint's host. ``tracer_provider``/``meter_provider`` default to the
    global OpenTelemetry providers.

    Call ``info()`` first: besides the tokenizer check it waits (up to ``info_timeout_s``) for the
    servers to be reachable, so that the first search does not spend its deadline on connecting.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        deadline_s: float = 0.1,
        token: str | None = None,
        *,
        tls: bool = False,
        tls_ca_file: str | Path | None = None,
        tls_cert_file: str | Path | None = None,
        tls_key_file: str | Path | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = 4 * MiB,
        keepalive_time_s: float = 30.0,
        info_timeout_s: float = 10.0,
        tracer_provider=None,
        meter_provider=None,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("RemoteRetriever needs at least one endpoint")
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.deadline_s = deadline_s
        self.info_timeout_s = info_timeout_s
        self._metadata = bearer_metadata(token)  # an empty token is an error, not "no token"
        credentials = _channel_credentials(
            tls or bool(tls_ca_file or tls_cert_file or tls_key_file),
            tls_ca_file, tls_cert_file, tls_key_file,
        )
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._channels = [_channel(e, credentials, options) for e in self.endpoints]
        self._info_stubs = [_traced_stub(c, tracer_provider) for c in self._channels]
        self._stream_stubs = [pb_grpc.RetrieverStub(c) for c in self._channels]
        self._telemetry = SearchTelemetry("client", tracer_provider, meter_provider)
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        self._watchdog = _Watchdog(tick_s=min(0.01, max(0.001, deadline_s / 10)))
        # Sessions left open would keep gRPC's sender threads waiting on their request queues.
        self._sessions: weakref.WeakSet[RemoteSession] = weakref.WeakSet()

    def info(self) -> DatastoreInfo:
        """The datastore's metadata; for several endpoints, their shards combined.

        Raises ``RetrieverUnavailable`` when an endpoint does not answer, and
        ``IncompatibleEndpoints`` when the endpoints do not serve one datastore's disjoint shards.
        """
        futures = [
            stub.Info.future(pb.InfoRequest(), timeout=self.info_timeout_s, metadata=self._metadata,
                             wait_for_ready=True)
            for stub in self._info_stubs
        ]
        infos = []
        for endpoint, future in zip(self.endpoints, futures):
            try:
                infos.append(wire.datastore_info(future.result()))
            except grpc.RpcError as exc:
                raise RetrieverUnavailable(
                    f"{endpoint} did not answer Info ({exc.code().name}: {exc.details()});"
                    " is retriever-server running there, with the same TLS and token settings?"
                ) from None
        return combine_infos(infos, self.endpoints)

    def session(self) -> RemoteSession:
        session = RemoteSession(self)
        self._sessions.add(session)
        return session

    def close(self) -> None:
        for session in list(self._sessions):
            session.close()
        self._watchdog.stop()
        for channel in self._channels:
            channel.close()


class RemoteSession(RetrievalSession):
    """One generation's streams: one ``SearchStream`` per endpoint, opened on first use.

    ``searches`` counts calls to ``search``; ``failures`` those that returned ``None`` because an
    endpoint failed, refused the search or was late.
    """

    def __init__(self, retriever: RemoteRetriever) -> None:
        self._retriever = retriever
        self._streams: list[_Stream] | None = None
        self.searches = 0
        self.failures = 0

    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult | None:
        self.searches += 1
        try:
            if self._streams is None:  # opened outside the search span: they outlive it
                self._streams = self._open_streams()
            with self._retriever._telemetry.search("SearchStream") as record:
                responses = self._exchange(wire.search_request(context, params))
                results = [wire.search_result(r) for r in responses]
                record.result = (
                    results[0] if len(results) == 1 else merge_results(results, params.budget)
                )
            return record.result
        except Exception as exc:  # noqa: BLE001 - by contract, any failure is "no draft"
            self.failures += 1
            self._drop_streams(exc)
            log.debug("search failed (%s: %s); no draft this step", type(exc).__name__, exc)
            return None

    def _exchange(self, request: pb.SearchRequest) -> list[pb.SearchResponse]:
        """Send ``request`` on every stream, then read one response from each."""
        watchdog = self._retriever._watchdog
        key = watchdog.arm(time.monotonic() + self._retriever.deadline_s, self._streams)
        try:
            for stream in self._streams:  # all requests first: the servers search in parallel
                stream.send(request)
            responses = [stream.receive() for stream in self._streams]
        finally:
            fired = watchdog.disarm(key)
        if fired:  # an answer that raced the cancellation is still late
            raise TimeoutError(f"no answer within {self._retriever.deadline_s} s")
        return responses

    def _open_streams(self) -> list[_Stream]:
        r = self._retriever
        return [_Stream(stub, r._metadata, r._tracer) for stub in r._stream_stubs]

    def _drop_streams(self, reason: BaseException | None) -> None:
        # A failed or late stream is out of step (a late response may still arrive), and the
        # others were cancelled with it: the next search opens fresh ones.
        for stream in self._streams or ():
            stream.close(reason)
        self._streams = None

    def close(self) -> None:
        self._drop_streams(None)


class _Stream:
    """One ``SearchStream`` call: requests go through a queue that gRPC's sender thread drains."""

    _END = object()

    def __init__(self, stub: pb_grpc.RetrieverStub, metadata, tracer: trace.Tracer) -> None:
        # The instrumentation's blocking-API stream interceptor hides the call object (so it
        # could not be cancelled) and starts its span lazily, so this span and the propagation
        # into the metadata are done here, the way the instrumentation does them for unary calls.
        service, method = STREAM_METHOD.lstrip("/").split("/")
        self.span = tracer.start_span(
            STREAM_METHOD,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = stub.SearchStream(
            iter(self._requests.get, self._END), metadata=tuple(metadata) + tuple(carrier.items())
        )

    def send(self, request: pb.SearchRequest) -> None:
        self._requests.put(request)

    def receive(self) -> pb.SearchResponse:
        try:
            return next(self.call)
        except StopIteration:
            raise ConnectionError(f"stream ended without an answer ({self.call.code()})") from None

    def cancel(self) -> None:
        self.call.cancel()
        self._requests.put(self._END)  # release gRPC's sender thread from the queue

    def close(self, reason: BaseException | None) -> None:
        if reason is None:
            self._requests.put(self._END)  # half-close: the server ends the stream with OK
        else:
            self.cancel()
            self.span.set_status(Status(StatusCode.ERROR, type(reason).__name__))
            if isinstance(reason, grpc.RpcError):
                self.span.set_attribute("rpc.grpc.status_code", reason.code().value[0])
        self.span.end()


class _Watchdog:
    """Cancels the streams of searches that outlive their deadline.

    A thread wakes every ``tick_s`` and cancels what is overdue, which makes the blocked read
    raise; a search is therefore given up at most ``tick_s`` after its deadline. Polling costs a
    wake-up per tick but nothing per search, where a timer per search would cost a thread hand-off.
    """

    def __init__(self, tick_s: float) -> None:
        self._tick_s = tick_s
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, list[_Stream]]] = {}
        self._fired: set[int] = set()
        self._next_key = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, streams: list[_Stream]) -> int:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="retriever-client-watchdog"
                )
                self._thread.start()
            key = self._next_key
            self._next_key += 1
            self._armed[key] = (deadline, streams)
        return key

    def disarm(self, key: int) -> bool:
        """Whether the deadline fired for ``key``."""
        with self._lock:
            self._armed.pop(key, None)
            if key in self._fired:
                self._fired.discard(key)
                return True
            return False

    def _run(self) -> None:
        while not self._stopped.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                overdue = [(k, s) for k, (d, s) in self._armed.items() if d <= now]
                for key, _ in overdue:
                    del self._armed[key]
                    self._fired.add(key)
            for _, streams in overdue:
                for stream in streams:
                    stream.cancel()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()


def combine_infos(infos: Sequence[DatastoreInfo], endpoints: Sequence[str]) -> DatastoreInfo:
    """One datastore's metadata from endpoints that each serve some of its shards."""
    first = infos[0]
    for endpoint, info in zip(endpoints[1:], infos[1:]):
        for name in ("tokenizer_fingerprint", "vocab_size", "format_version"):
            if getattr(info, name) != getattr(first, name):
                raise IncompatibleEndpoints(
                    f"{endpoint} serves a datastore with {name}={getattr(info, name)!r}, but"
                    f" {endpoints[0]} has {getattr(first, name)!r}: point the client at shards"
                    " of one datastore"
                )
    shards = [s for info in infos for s in info.shards]
    if len(set(shards)) != len(shards):
        raise IncompatibleEndpoints(
            f"endpoints {list(endpoints)} serve overlapping shards {shards}: every shard must be"
            " served by exactly one endpoint, or its counts would be added twice"
        )
    return DatastoreInfo(
        format_version=first.format_version,
        vocab_size=first.vocab_size,
        n_tokens=sum(i.n_tokens for i in infos),
        n_docs=sum(i.n_docs for i in infos),
        tokenizer_name=first.tokenizer_name,
        tokenizer_fingerprint=first.tokenizer_fingerprint,
        shards=tuple(shards),
    )


def _channel(endpoint: str, credentials, options) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(endpoint, options)
    return grpc.secure_channel(endpoint, credentials, options)


def _traced_stub(channel: grpc.Channel, tracer_provider) -> pb_grpc.RetrieverStub:
    """A stub for unary calls, traced by the gRPC instrumentation (which handles them well)."""
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return pb_grpc.RetrieverStub(
        intercept_channel(channel, client_interceptor(tracer_provider=tracer_provider))
    )


def _channel_credentials(tls: bool, ca_file, cert_file, key_file):
    if not tls:
        return None
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both tls_cert_file and tls_key_file")

    def read(path):
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )
