"""``RemoteRetriever``: ``rest.retriever.Retriever`` over replicated, sharded retrieval servers.

    with RemoteRetriever(["retriever-0:50051", "retriever-1:50051"], deadline_s=0.05) as r:
        with r.session() as session:                  # one per generation
            result = session.search(context, params)  # None: no draft this step

Endpoints and replicas. Each endpoint is ``host:port``; a name that resolves to several
addresses (a Kubernetes headless Service) is one endpoint per address, resolved again every
``resolve_interval_s`` as pods come and go (``discovery.py``). Every endpoint reports its shards
in ``Info``: endpoints that report the same shards are replicas of one replica set, with no other
configuration, and the replica sets together must cover disjoint shards of one datastore.

A search (one decoding step) goes to one replica of every replica set at once; their answers are
merged (``merge.py``). Within a set (``replicas.py`` keeps the score):

- choice: power of two choices on peak-EWMA latency x (searches in flight + 1);
- failover: an error sends the search to another replica at once, within the same deadline;
- hedging (gRPC A6, ``A006-client-retries.md``; gRPC Python has none): a search that has run
  longer than its shard's recent p95 goes to a second replica too; the first answer wins, one
  deadline spans all attempts, at most ``max_attempts`` per shard, and a token bucket stops
  failovers and hedges when the shard keeps failing;
- health (gRPC A17, ``health.py``): replicas that are not SERVING, overall or for one of their
  shards, get no searches;
- ejection (the circuit breaker): after consecutive failures an endpoint gets no searches for a
  while, then one probe (gRPC A50 on consecutive failures, Envoy ``outlier.rst``);
- deadlines: ``deadline_s`` bounds a search from the call to the merged answer; within it each
  shard's own deadline is derived from its recent latencies (4 x p99, at least 50 ms), so a
  stalled shard costs less than the whole deadline; an endpoint that owes an answer given up late gets
  no new search until it answers (or ``owed_timeout_s`` passes), so a stall costs that deadline
  once, not on every step of every session, and nothing while the endpoint is ejected. The step
  goes on with the shards that answered in time.

A failed or late search is ``None`` ("no draft": the decoder takes a plain step, the output is
unchanged), never an exception; so is an answer that breaks the contract (``answers.py``).

Starting while the servers are down is fine: the constructor does not connect; ``info()`` raises
``RetrieverUnavailable`` within ``info_timeout_s`` when no endpoint has answered, sessions
answer ``None`` at once until one does, and use it from then on. Channels reconnect within about
half a second of a server coming back (``RECONNECT_OPTIONS``).

Streams. A session keeps one ``SearchStream`` per endpoint it uses, for its whole life, so a step
costs one message each way, not a new call. Each stream has a reader thread that hands answers to
the waiting step; the step waits on a condition with a timeout (its deadline or its next hedge),
so a late answer never blocks it. A late answer that still arrives is measured (so the adaptive
deadline follows a server that became slower) and dropped. A stream left with unanswered searches
is cancelled before its endpoint is used again.

Search port. A server whose ``Info`` reports ``search_port`` serves ``Search`` and
``SearchStream`` there too, natively, at a fraction of the main port's cost per message: streams
to that endpoint go to the same address (with the same TLS, server name and token) at that port;
``Info`` and health stay on the main port. A search port that fails (refused, UNAVAILABLE, not
listening yet) is no failure of the endpoint: the searches that were on it are sent again at once
on the main port, which serves the same answers, and the endpoint searches there until
``search_port_retry_s`` has passed. ``use_search_port=False`` keeps everything on the main port.

The client uses gRPC's blocking API, not ``grpc.aio``: ``grpc.aio`` supports one event loop per
process, and a library that ran its own loop in a thread would collide with an application's (or a
test's in-process server's).

Metrics (OpenTelemetry, per shard set and endpoint: a bounded set of labels):
``rest.retriever.client.attempt.duration`` (s), ``rest.retriever.client.attempts`` (by kind:
first, failover, hedge), ``rest.retriever.client.failures`` (by reason),
``rest.retriever.client.ejections``, ``rest.retriever.client.overflow``,
``rest.retriever.client.shard_misses``, ``rest.retriever.client.search_port.fallbacks``; the same
figures as numbers from ``stats()``, which also counts searches sent per port (``sent_search_port``,
``sent_main_port``).
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import random
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import grpc
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from rest._engine import Mailbox, NativeSearchChannel
from rest.retriever import RetrievalSession, Retriever, RetrieverUnavailable
from rest.types import DatastoreInfo, SearchParams, SearchResult
from retriever_service import wire
from retriever_service.answers import InvalidAnswer, check_levels, check_result
from retriever_service.auth import bearer_metadata
from retriever_service.discovery import (
    Address,
    Discovery,
    Resolver,
    parse_targets,
    system_resolver,
)
from retriever_service.health import Health, HealthWatch
from retriever_service.merge import merge_levels, merge_results
from retriever_service.replicas import (
    Clock,
    Ejection,
    EjectionState,
    PeakEwma,
    ReplicaPolicy,
    ShardStats,
    pick_two,
)
from retriever_service.telemetry import INSTRUMENTATION_NAME, SearchTelemetry
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc

log = logging.getLogger("retriever_service.client")

STREAM_METHOD = "/rest.retriever.v1.Retriever/SearchStream"
SERVICE_NAME = "rest.retriever.v1.Retriever"
MiB = 1 << 20

# gRPC's defaults (1 s initial backoff growing 1.6x to 120 s, 20 s connect timeout) leave a
# client 8-10 s behind a server that restarted. A connection refused is cheap to retry: back off
# from 100 ms to at most 500 ms (jittered +-20%), so a server that is back is used within 0.6 s.
# The minimum connect timeout bounds how long one attempt to an unresponsive address may hang.
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 2000),
)
# A native stream's connection attempt gives up after this long (gRPC's minimum connect timeout
# above); the step's deadline bounds what a search waits anyway.
_CONNECT_TIMEOUT_S = 2.0
# Codes that say the request itself was refused: every replica would refuse it too.
_FATAL = frozenset({grpc.StatusCode.INVALID_ARGUMENT})
# How a search stream on the search port ends when nothing serves there (refused, reset, not
# listening yet, a listener that does not know the method, one that went away): the main port is
# used instead. A refusal of the request itself (limits, token) would come from the main port too.
_SEARCH_PORT_DOWN = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
})


class IncompatibleEndpoints(ValueError):
    """The endpoints do not serve disjoint shards of one datastore."""


class RemoteRetriever(Retriever):
    """Retrieval from ``retriever-server`` endpoints (``"host:port"``, a list of them, or one
    comma-separated string); see the module docstring for replicas and failures.

    ``deadline_s`` bounds each search, from the call to the merged answer. ``token`` is sent as
    ``authorization: Bearer <token>``. TLS is used when ``tls`` is true or any ``tls_*`` file is
    given: ``tls_ca_file`` to trust the server's certificate (default: the system's roots),
    ``tls_cert_file``/``tls_key_file`` for mutual TLS, ``tls_server_name`` when the certificate's
    name differs from the endpoint's host (an address resolved from a name is checked against
    that name). ``use_search_port``: send searches to a server's search port when it reports
    one (see the module docstring). ``policy`` holds the replica choices
    (``replicas.ReplicaPolicy``).
    ``tracer_provider``/``meter_provider`` default to the global OpenTelemetry providers.
    ``now``, ``rng`` and ``resolver`` are for tests.
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
        info_timeout_s: float = 1.0,
        resolve_interval_s: float = 5.0,
        use_search_port: bool = True,
        policy: ReplicaPolicy | None = None,
        tracer_provider=None,
        meter_provider=None,
        now: Clock = time.monotonic,
        rng: random.Random | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        targets = parse_targets(endpoints)
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if info_timeout_s <= 0 or resolve_interval_s <= 0:
            raise ValueError("info_timeout_s and resolve_interval_s must be > 0")
        self.endpoints = [t.text for t in targets]
        self.deadline_s = deadline_s
        self.info_timeout_s = info_timeout_s
        self.use_search_port = use_search_port
        self.policy = policy or ReplicaPolicy()
        self._now = now
        self._rng = rng or random.Random()
        self._metadata = bearer_metadata(token)  # an empty token is an error, not "no token"
        tls_files = _tls_files(tls or bool(tls_ca_file or tls_cert_file or tls_key_file),
                               tls_ca_file, tls_cert_file, tls_key_file)
        self._credentials = None if tls_files is None else grpc.ssl_channel_credentials(
            root_certificates=tls_files[0], private_key=tls_files[2],
            certificate_chain=tls_files[1])
        self._tls_files = tls_files  # (CA, certificate, key) PEMs, each None if not given
        self._tls_server_name = tls_server_name
        self._max_message_bytes, self._keepalive_time_s = max_message_bytes, keepalive_time_s
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
            *RECONNECT_OPTIONS,
        ]
        self._tracer_provider = tracer_provider
        self._telemetry = SearchTelemetry("client", tracer_provider, meter_provider)
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        self._metrics = _Metrics(meter_provider)
        self._pool = _Pool(self, Discovery(targets, resolver), resolve_interval_s)
        # Sessions left open would keep gRPC's sender threads waiting on their request queues.
        self._sessions: weakref.WeakSet[RemoteSession] = weakref.WeakSet()

    def info(self) -> DatastoreInfo:
        """The datastore's metadata: the shards of every replica set combined.

        Waits at most ``info_timeout_s`` for endpoints not heard from yet. Raises
        ``RetrieverUnavailable`` when no endpoint has answered, and ``IncompatibleEndpoints`` when
        the endpoints do not serve disjoint shards of one datastore.
        """
        self._pool.wait_first_round(self.info_timeout_s)
        return self._pool.combined_info()

    def session(self) -> RemoteSession:
        session = RemoteSession(self)
        self._sessions.add(session)
        return session

    def stats(self) -> dict:
        """Counters per replica set and per endpoint (the metrics, as plain numbers)."""
        return self._pool.stats()

    def refresh(self) -> None:
        """Resolve names again now instead of at the next interval."""
        self._pool.wake(resolve=True)

    def close(self) -> None:
        for session in list(self._sessions):
            session.close()
        self._pool.close()


class RemoteSession(RetrievalSession):
    """One generation's streams: one ``SearchStream`` per endpoint it uses, opened on first use.

    ``searches`` counts calls to ``search``; ``failures`` those that returned ``None`` (no
    replica set answered in time, or every answer was refused); ``partial`` those answered by
    only some replica sets; ``invalid_answers`` the answers refused by ``answers.check_result``.
    """

    def __init__(self, retriever: RemoteRetriever) -> None:
        self._retriever = retriever
        self._streams: dict[_Endpoint, _Stream] = {}
        self.searches = 0
        self.failures = 0
        self.partial = 0
        self.invalid_answers = 0
        self._closed = False

    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult | None:
        return self._search(context, params, None)

    def search_levels(
        self, context: Sequence[int], params: SearchParams, levels: int
    ) -> list[SearchResult] | None:
        """Every back-off level in one round trip: each server answers all levels of its shards,
        merged level by level (``merge.merge_levels``). Against a server that predates
        ``SearchRequest.levels`` (it answers one level), one search per level."""
        if levels > 1 and any(e.levels_supported is False for g in self._retriever._pool.routing()
                              for e in g.endpoints):
            return super().search_levels(context, params, levels)
        return self._search(context, params, levels)

    def _search(self, context: Sequence[int], params: SearchParams, levels: int | None):
        self.searches += 1
        r = self._retriever
        record = None
        try:
            with r._telemetry.search("SearchStream") as record:
                request = wire.search_request(context, params, levels=levels)
                record.stamp(request)  # the server's span for this search becomes its child
                answers = self._fan_out(request, params, levels)
                if answers is None:
                    record.error = "no answer"
                elif levels is not None:
                    record.result = merge_levels(answers, params.budget, levels)
                elif len(answers) == 1:
                    record.result = answers[0]
                else:
                    record.result = merge_results(answers, params.budget)
        except _OlderServer:
            return super().search_levels(context, params, levels)
        except Exception as exc:  # noqa: BLE001 - by contract, any failure is "no draft"
            log.warning("search failed (%s: %s); no draft this step", type(exc).__name__, exc,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            if record is not None:
                record.result = None
        result = None if record is None else record.result
        if result is None:
            self.failures += 1
        return result

    # --- one step: every replica set at once ---------------------------------------------------

    def _fan_out(self, request: pb.SearchRequest, params: SearchParams,
                 levels: int | None) -> list | None:
        """Every replica set's answer that came in time (``None``: none did); with ``levels``,
        each answer is a list of levels."""
        r = self._retriever
        if self._closed:
            return None
        self._drop_removed_streams()
        now = r._now
        start = now()
        if not r._pool.settled:  # just made: give discovery up to this search's deadline
            r._pool.wait_first_round(r.deadline_s, health=True)
        groups = r._pool.routing()
        if not groups:
            return None
        step = _Step()
        calls = [
            _ShardCall(group, request, params, levels,
                       start + group.stats.deadline(r.deadline_s), group.stats.hedge_delay())
            for group in groups
        ]
        for call in calls:
            self._attempt(step, call, "first", start)
            for endpoint in call.group.probes():
                self._probe(step, call, endpoint, start)
        events = step.take(0)
        while True:
            for attempt, outcome in events:
                self._settle(step, attempt, outcome)
            t = now()
            wake = None
            for call in calls:
                if call.finished:
                    continue
                if t >= call.deadline:
                    self._give_up(call)
                    continue
                if call.hedge_at is not None and t >= call.hedge_at:
                    self._hedge(step, call, t)
                if not call.finished:
                    due = call.deadline if call.hedge_at is None else min(call.deadline,
                                                                          call.hedge_at)
                    wake = due if wake is None else min(wake, due)
            if wake is None:
                break
            events = step.take(wake - t)
        for attempt, outcome in step.close():  # outcomes that raced the end of the step
            self._settle(step, attempt, outcome)
        if any(isinstance(c.error, _OlderServer) for c in calls):
            raise _OlderServer()
        answers = []
        for call in calls:
            group = call.group
            if call.result is not None:
                group.stats.throttle.on_success()
                group.answered += 1
                answers.append(call.result)
            else:
                if call.attempts:  # A6 counts searches that failed, not shards skipped
                    group.stats.throttle.on_failure()
                group.missed += 1
                r._metrics.shard_misses.add(1, group.attributes)
        if not answers:
            return None
        if len(answers) < len(calls):
            self.partial += 1
        return answers

    def _attempt(self, step: _Step, call: _ShardCall, kind: str, t: float) -> bool:
        """Send ``call``'s search to one more replica; ``False`` when none can take it."""
        r = self._retriever
        group = call.group
        endpoint = group.choose(call.tried, r._rng)
        if endpoint is None:
            if group.at_capacity(call.tried):
                group.overflow += 1
                r._metrics.overflow.add(1, group.attributes)
            if not call.outstanding():
                call.finished = True
            return False
        call.tried.add(endpoint)
        attempt = _Attempt(step, call, endpoint, t)
        call.attempts.append(attempt)
        endpoint.count_attempt(kind)
        if kind == "hedge":
            group.hedges += 1
        elif kind == "failover":
            group.failovers += 1
        if call.hedge_delay is not None:
            call.hedge_at = t + call.hedge_delay
        try:
            self._stream_for(endpoint).send(attempt, call.request)
        except Exception as exc:  # noqa: BLE001 - a stream that cannot be used is a failure
            self._settle(step, attempt, exc)
        return True

    def _probe(self, step: _Step, call: _ShardCall, endpoint: _Endpoint, t: float) -> None:
        """Send the step's search to an endpoint whose ejection is over, without waiting for it:
        its answer decides whether the endpoint serves again."""
        probe = _ShardCall(call.group, call.request, call.params, call.levels, t, None)
        probe.finished = probe.probe = True
        attempt = _Attempt(step, probe, endpoint, t)
        probe.attempts.append(attempt)
        endpoint.count_attempt("probe")
        try:
            self._stream_for(endpoint).send(attempt, probe.request)
        except Exception as exc:  # noqa: BLE001 - a failed probe
            self._settle(step, attempt, exc)

    def _hedge(self, step: _Step, call: _ShardCall, t: float) -> None:
        call.hedge_at = None
        if len(call.attempts) < self._retriever.policy.max_attempts and \
                call.group.stats.throttle.allows_more_attempts():
            self._attempt(step, call, "hedge", t)

    def _settle(self, step: _Step, attempt: _Attempt, outcome) -> None:
        """Account one attempt's outcome (an answer, or the exception that replaced it) within
        its step: the shard's answer, or a failure that may fail over to another replica."""
        r = self._retriever
        call, endpoint = attempt.call, attempt.endpoint
        if attempt.late:  # given up at the deadline, and already counted: the debt is paid
            endpoint.owe(-1)
            if not isinstance(outcome, BaseException):
                endpoint.succeeded()
            return
        attempt.resolved = True
        if isinstance(outcome, _SearchPortDown):
            if not call.finished or call.probe:
                self._resend(step, attempt)
            return
        if not isinstance(outcome, BaseException):
            endpoint.succeeded()
            if not call.finished:
                call.result = outcome
                call.finished = True
            return
        if isinstance(outcome, _OlderServer):
            endpoint.succeeded()  # it works, and the session falls back to a search per level
            call.error, call.finished = outcome, True
            return
        if isinstance(outcome, InvalidAnswer):
            self.invalid_answers += 1
        endpoint.failed(outcome)
        if call.finished:
            return
        call.error = outcome
        if isinstance(outcome, grpc.RpcError) and outcome.code() in _FATAL:
            call.finished = True  # every replica would refuse this request
            return
        if len(call.attempts) < r.policy.max_attempts and \
                call.group.stats.throttle.allows_more_attempts() and \
                self._attempt(step, call, "failover", r._now()):
            return
        if not call.outstanding():
            call.finished = True

    def _resend(self, step: _Step, attempt: _Attempt) -> None:
        """Send a search again to the same endpoint, whose search port failed under it: now on
        its main port, within the same deadline and as the same attempt (not a failover)."""
        call, endpoint = attempt.call, attempt.endpoint
        again = _Attempt(step, call, endpoint, self._retriever._now())
        call.attempts[call.attempts.index(attempt)] = again
        try:
            self._stream_for(endpoint).send(again, call.request)
        except Exception as exc:  # noqa: BLE001 - a stream that cannot be used is a failure
            self._settle(step, again, exc)

    def _give_up(self, call: _ShardCall) -> None:
        """The shard's deadline passed: its attempts still out are failures (late)."""
        call.finished = True
        for attempt in call.attempts:
            if not attempt.resolved:
                attempt.resolved = attempt.late = True
                attempt.endpoint.failed(None)
                attempt.endpoint.owe(+1)

    # --- streams ---------------------------------------------------------------------------------

    def _stream_for(self, endpoint: _Endpoint) -> _Stream | _NativeStream:
        stream = self._streams.get(endpoint)
        if stream is not None and (stream.dead or stream.busy()):
            # Dead, or still owing answers to searches given up: out of step with this session.
            stream.close(cancel=True)  # (a search port found dead is reported here)
            stream = None
        port, open_stream = endpoint.stream_route()
        if stream is not None and stream.port != port:
            stream.close(cancel=False)  # the search port failed, came back, or changed
            stream = None
        if stream is None:
            r = self._retriever
            stream = open_stream(endpoint, port, r._metadata, r._tracer)
            self._streams[endpoint] = stream
        return stream

    def _drop_removed_streams(self) -> None:
        for endpoint in [e for e in self._streams if e.removed]:
            self._streams.pop(endpoint).close(cancel=True)

    def close(self) -> None:
        self._closed = True
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.close(cancel=stream.busy())


class _Step:
    """Where the outcomes of a step's searches arrive, and its thread waits for them with the GIL
    released (the engine's ``Mailbox``): put there by gRPC Python streams' reader threads as
    outcomes, or by native streams as an answer's bytes or a failure's status, which are made
    outcomes here, on the step's thread."""

    __slots__ = ("mailbox",)

    def __init__(self) -> None:
        self.mailbox = Mailbox()

    def deliver(self, attempt: _Attempt, outcome) -> bool:
        """Hand over an outcome; ``False`` when the step is over (the attempt was given up, or
        another replica answered first)."""
        return self.mailbox.put(attempt, outcome)

    def take(self, timeout: float) -> list:
        """The outcomes delivered so far, waiting up to ``timeout`` for a first one."""
        return _outcomes(self.mailbox.take(timeout))

    def close(self) -> list:
        """End the step; returns the outcomes delivered and not taken."""
        return _outcomes(self.mailbox.close())


def _outcomes(items: list) -> list:
    """``(attempt, outcome)`` for each of a mailbox's ``(attempt, kind, payload)``."""
    events = []
    for attempt, kind, payload in items:
        if kind == _ANSWER:
            payload = attempt.stream.answered(attempt, payload)
        elif kind == _FAILURE:
            payload = attempt.stream.failed(attempt, *payload)
        events.append((attempt, payload))
    return events


_ANSWER, _FAILURE = 1, 2  # a native stream's kinds of mailbox item (grpc_client.rs)


class _ShardCall:
    """One replica set's part of one step."""

    __slots__ = ("group", "request", "params", "levels", "deadline", "hedge_delay", "hedge_at",
                 "attempts", "tried", "result", "error", "finished", "probe")

    def __init__(self, group: _ReplicaSet, request: pb.SearchRequest, params: SearchParams,
                 levels: int | None, deadline: float, hedge_delay: float | None) -> None:
        self.group = group
        self.request = request
        self.params = params
        self.levels = levels
        self.deadline = deadline
        self.hedge_delay = hedge_delay
        self.hedge_at: float | None = None
        self.attempts: list[_Attempt] = []
        self.tried: set[_Endpoint] = set()
        self.result = None
        self.error: BaseException | None = None  # the last failure, when no answer came
        self.finished = False
        self.probe = False  # a probe: nothing waits for it

    def outstanding(self) -> bool:
        return any(not a.resolved for a in self.attempts)

    def convert(self, data: bytes, endpoint: _Endpoint):
        """The answer (a serialized ``SearchResponse``, decoded by the engine) as ``rest.types``
        (a list of levels when levels were asked for), checked (``InvalidAnswer``)."""
        info = endpoint.info
        context_tokens = len(self.request.context)
        if self.levels is None:
            levels, searched = wire.decode_response(data)
            _check_searched(searched, info)
            check_result(levels[0], self.params, context_tokens, info.vocab_size)
            return levels[0]
        levels, searched = wire.decode_levels(data)
        _check_searched(searched, info)
        if self.levels > 1 and len(levels) == 1 and \
                levels[0].match_length > self.params.min_span:
            endpoint.levels_supported = False  # a shorter suffix always occurs: it ignored levels
            raise _OlderServer()
        endpoint.levels_supported = True
        check_levels(levels, self.params, context_tokens, info.vocab_size, self.levels)
        return levels


def _check_searched(searched: Sequence[str], info: DatastoreInfo) -> None:
    if searched and not set(searched) <= set(info.shards):
        raise InvalidAnswer(f"an answer for shards {list(searched)}, not"
                            f" among the server's {list(info.shards)}")


class _OlderServer(Exception):
    """A server that answered one level where several were asked for (it predates
    ``SearchRequest.levels``)."""


class _SearchPortDown(Exception):
    """A search that got no answer because its stream was on the endpoint's search port and
    that port failed: to be sent again on the main port."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the search port failed: {_reason(error)}")


class _Attempt:
    """One search sent to one endpoint."""

    __slots__ = ("step", "call", "endpoint", "sent_at", "stream", "resolved", "late")

    def __init__(self, step: _Step, call: _ShardCall, endpoint: _Endpoint, sent_at: float):
        self.step = step
        self.call = call
        self.endpoint = endpoint
        self.sent_at = sent_at
        self.stream: _NativeStream | None = None  # set when sent on a native stream
        self.resolved = False  # settled by its step (answered, failed, or given up)
        self.late = False  # given up at its shard's deadline


def _stream_span(tracer: trace.Tracer, endpoint: _Endpoint, port: int):
    """A stream's client span, and the metadata that makes the server's spans its children.

    The instrumentation's blocking-API stream interceptor hides the call object (so it could not
    be cancelled) and starts its span lazily, so the span and the propagation into the metadata
    are done here, the way the instrumentation does them for unary calls."""
    service, method = STREAM_METHOD.lstrip("/").split("/")
    span = tracer.start_span(
        STREAM_METHOD,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                    "server.address": endpoint.address, "rest.retriever.search_port": port},
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, tuple(carrier.items())


class _Stream:
    """One ``SearchStream`` of one session to one endpoint through gRPC Python, on its main port
    (``port`` 0) or on its search port.

    Requests go through a queue that gRPC's sender thread drains; a reader thread takes every
    response, matches it to the oldest search sent (the server answers in order), and hands it
    to that search's step, or, when the step has moved on, to the endpoint's bookkeeping.
    """

    _END = object()

    def __init__(self, method, endpoint: _Endpoint, port: int, metadata,
                 tracer: trace.Tracer) -> None:
        self.endpoint = endpoint
        self.port = port
        self._pending: collections.deque[_Attempt] = collections.deque()
        self._lock = threading.Lock()
        self.dead = False
        self._ended: BaseException | None = None  # why it is dead
        self._cancelled = False
        self._closed = False  # by this client: its end is no failure of the search port
        self.span, trace_metadata = _stream_span(tracer, endpoint, port)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = method(iter(self._requests.get, self._END),
                           metadata=tuple(metadata) + trace_metadata)
        threading.Thread(target=self._read, daemon=True,
                         name=f"retriever-stream {endpoint.address}").start()

    def busy(self) -> bool:
        return bool(self._pending)

    def send(self, attempt: _Attempt, request: pb.SearchRequest) -> None:
        with self._lock:
            if self.dead:
                # A search port that failed before this search was sent: send it again too.
                if isinstance(self._ended, _SearchPortDown):
                    raise self._ended
                raise ConnectionError(f"the stream to {self.endpoint.address} has ended")
            self._pending.append(attempt)
            self.endpoint.sent(self.port)
        self._requests.put(request)

    def _read(self) -> None:
        error: BaseException
        try:
            for response in self.call:
                with self._lock:
                    attempt = self._pending.popleft() if self._pending else None
                if attempt is None:
                    raise ConnectionError("an answer to no request")
                if self.port:
                    self.endpoint.search_port_answered(self.port)
                try:
                    self.endpoint.on_response(attempt, response)
                except Exception as exc:  # noqa: BLE001 - a bug here must not lose the step
                    log.exception("handling an answer from %s failed", self.endpoint.address)
                    attempt.step.deliver(attempt, exc)
            error = ConnectionError(f"{self.endpoint.address} ended the stream")
        except grpc.RpcError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - handed to the waiting searches
            error = exc
        if self.port and not self._closed and (
                not isinstance(error, grpc.RpcError) or error.code() in _SEARCH_PORT_DOWN):
            self.endpoint.search_port_failed(self.port, error)
            error = _SearchPortDown(error)
        with self._lock:
            self.dead, self._ended = True, error
            pending = list(self._pending)
            self._pending.clear()
        for attempt in pending:
            self.endpoint.on_error(attempt, error)
        if not self._cancelled and pending:
            self.span.set_status(Status(StatusCode.ERROR, _reason(error)))
            if isinstance(error, grpc.RpcError):
                self.span.set_attribute("rpc.grpc.status_code", error.code().value[0])
        self.span.end()

    def close(self, cancel: bool) -> None:
        """Half-close (the server ends the stream with OK), or cancel it (searches still owed
        are given up)."""
        self._closed = True
        if cancel:
            self._cancelled = True
            self.call.cancel()
        self._requests.put(self._END)  # releases gRPC's sender thread from the queue


class _NativeStream:
    """One ``SearchStream`` of one session to one endpoint on the engine's native client
    (``NativeSearchStream``, grpc_client.rs): the same searches and outcomes as ``_Stream``,
    with no thread of its own. An answer or a failure is handed to its step's mailbox as bytes
    or a status and made an outcome on the step's thread (``answered``, ``failed``); one that
    comes after its step is over reaches ``_late`` on a thread of the engine's."""

    def __init__(self, channel: NativeSearchChannel, endpoint: _Endpoint, port: int, metadata,
                 tracer: trace.Tracer) -> None:
        self.endpoint = endpoint
        self.port = port
        self._cancelled = False
        self._closed = False
        self._end_reported = False
        self._lock = threading.Lock()
        self.span, trace_metadata = _stream_span(tracer, endpoint, port)
        self._stream = channel.open_stream(list(metadata) + list(trace_metadata), self._late)

    @property
    def dead(self) -> bool:
        return self._stream.ended() is not None

    def busy(self) -> bool:
        return self._stream.pending() > 0

    def send(self, attempt: _Attempt, request: pb.SearchRequest) -> None:
        attempt.stream = self
        if not self._stream.send(request.SerializeToString(), attempt.step.mailbox, attempt):
            raise self._error(*self._stream.ended())
        self.endpoint.sent(self.port)

    def answered(self, attempt: _Attempt, response: bytes):
        if self.port:
            self.endpoint.search_port_answered(self.port)
        return self.endpoint.outcome_of(attempt, response)

    def failed(self, attempt: _Attempt, code: int, message: str) -> BaseException:
        self.endpoint.arrived(None)
        return self._error(code, message)

    def _error(self, code: int, message: str) -> BaseException:
        """What the searches a stream ended under failed of: like ``_Stream._read``, a search
        port that fails is reported once, and its searches are to be sent on the main port."""
        if code == _ENDED:
            error: BaseException = ConnectionError(f"{self.endpoint.address} ended the stream")
        else:
            error = _NativeRpcError(_STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN), message)
        if self._cancelled:
            return error
        port_down = bool(self.port) and (code == _ENDED or error.code() in _SEARCH_PORT_DOWN)
        with self._lock:
            first, self._end_reported = not self._end_reported, True
        if first:  # the step's thread and an engine thread may both get here
            self.span.set_status(Status(StatusCode.ERROR, _reason(error)))
            if isinstance(error, grpc.RpcError):
                self.span.set_attribute("rpc.grpc.status_code", error.code().value[0])
            if port_down:
                self.endpoint.search_port_failed(self.port, error)
        return _SearchPortDown(error) if port_down else error

    def _late(self, attempt: _Attempt, response: bytes | None, code: int, message: str) -> None:
        try:
            outcome = self.answered(attempt, response) if response is not None \
                else self.failed(attempt, code, message)
            self.endpoint.after_step(attempt, outcome)
        except Exception:  # noqa: BLE001 - on the engine's thread: log, never raise there
            log.exception("handling a late outcome from %s failed", self.endpoint.address)

    def close(self, cancel: bool) -> None:
        """Half-close (the server ends the stream with OK), or cancel it (searches still owed
        are given up). A stream found ended by itself is accounted for here."""
        if self._closed:
            return
        self._closed = True
        ended = self._stream.ended()
        if ended is not None:
            self._error(*ended)
        self._cancelled = cancel
        self._stream.close(cancel)
        self.span.end()


class _NativeRpcError(grpc.RpcError):
    """A native stream's gRPC status, read the way gRPC Python's errors are (``code()``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_ENDED = -1  # a native stream that the server ended without a status (grpc_client.rs)


class _Endpoint:
    """One address: its channel, what it serves, its health, ejection and load."""

    def __init__(self, pool: _Pool, address: Address) -> None:
        r = pool.retriever
        self.pool = pool
        self.address = address.dial
        self.target = address.target
        options = list(r._options)
        server_name = r._tls_server_name
        if server_name is None and r._credentials is not None and address.target.is_name:
            server_name = address.target.host  # dialled by address, verified by name
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._credentials, self._channel_options = r._credentials, options
        self._server_name = server_name
        self.channel = _channel(self.address, r._credentials, options)
        self._dial = address
        self._use_search_port = r.use_search_port
        # The search port as ``Info`` reports it (0: none), its channel, and until when it is
        # passed over after failing (``ReplicaPolicy.search_port_retry_s``).
        self.search_port = 0
        self._search_channel: grpc.Channel | NativeSearchChannel | None = None
        self._search_route: tuple[int, object] = (0, None)  # (port, what opens its streams)
        self.search_port_down_until: float | None = None
        self._search_port_retry_s = r.policy.search_port_retry_s
        _, open_main = self._search_streams(self.address, self.channel)
        self._main_route = (0, open_main)
        self.info_stub = _traced_stub(self.channel, r._tracer_provider)
        self.info: DatastoreInfo | None = None
        self.info_error: str | None = None
        self.info_outcomes = 0  # Info answers and errors so far
        self.info_in_flight = False
        self.info_stale = False
        self.info_retry_at = 0.0
        self.info_backoff_s = _INFO_BACKOFF_S[0]
        self.incompatible: str | None = None
        self.levels_supported: bool | None = None  # unknown until it answers levels
        self.removed = False
        self.watches: list[HealthWatch] = []
        self.health = Health.UNKNOWN
        self.health_answered = False  # the overall watch answered or failed at least once
        self.ever_served = False
        self.fully_serving = False
        policy = r.policy
        self.max_in_flight = policy.max_in_flight
        self.ejection = Ejection(policy.ejection, r._now)
        self.ewma = PeakEwma(policy.default_rtt_s, policy.ewma_decay_s, r._now)
        self.in_flight = 0
        self.owed = 0  # searches given up late whose answers have not come yet
        self.owed_since = 0.0
        self._owed_timeout_s = policy.owed_timeout_s
        self.counts = collections.Counter()
        self.set_group(None)
        self._now = r._now
        self._metrics = r._metrics
        self._lock = threading.Lock()
        self._health_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<endpoint {self.address}>"

    def set_group(self, group: _ReplicaSet | None) -> None:
        self.group = group
        self.attributes = {"shard": group.label if group else "", "endpoint": self.address}
        self.answered_attributes = {**self.attributes, "outcome": "ok"}
        self.kind_attributes = {kind: {**self.attributes, "kind": kind}
                                for kind in ("first", "failover", "hedge", "probe")}

    # --- choice ---------------------------------------------------------------------------------

    def cost(self) -> float:
        return self.ewma.estimate() * (self.in_flight + 1)

    def healthy(self, fully: bool) -> bool:
        return (self.fully_serving if fully else self.health is Health.SERVING) \
            and not self.removed

    def below_cap(self) -> bool:
        return self.in_flight < self.max_in_flight

    def owes_late_answers(self) -> bool:
        """Whether a search given up at its deadline is still unanswered (and not for long): a
        stalled server costs one deadline, not one per step and session, until it answers."""
        return self.owed > 0 and self._now() - self.owed_since < self._owed_timeout_s

    def owe(self, change: int) -> None:
        with self._lock:
            self.owed += change
            if change > 0:
                self.owed_since = self._now()

    # --- what happens to its searches -----------------------------------------------------------

    def count_attempt(self, kind: str) -> None:
        with self._lock:
            self.counts[f"attempts_{kind}"] += 1
        self._metrics.attempts.add(1, self.kind_attributes[kind])

    def sent(self, port: int) -> None:
        with self._lock:
            self.in_flight += 1
            self.counts["sent_search_port" if port else "sent_main_port"] += 1

    def arrived(self, latency: float | None) -> None:
        """A search sent to it is over: answered in ``latency`` s, or ``None`` (no answer)."""
        with self._lock:
            self.in_flight -= 1
            if latency is not None:
                self.ewma.observe(latency)
        if latency is not None:
            if self.group is not None:
                self.group.stats.latencies.add(latency)
            self._metrics.add_sample(latency, self.answered_attributes)

    def outcome_of(self, attempt: _Attempt, response: bytes):
        """The outcome of one answer to ``attempt``: the result, or the exception that replaces
        it (``InvalidAnswer``, ``_OlderServer``)."""
        latency = self._now() - attempt.sent_at
        try:
            outcome = attempt.call.convert(response, self)
        except _OlderServer as exc:
            outcome = exc
            self.arrived(latency)
        except Exception as exc:  # noqa: BLE001 - InvalidAnswer, or a conversion that failed
            outcome = exc if isinstance(exc, InvalidAnswer) else InvalidAnswer(str(exc))
            log.warning("refused an answer from %s: %s", self.address, outcome)
            self.arrived(None)
        else:
            self.arrived(latency)
        return outcome

    def on_response(self, attempt: _Attempt, response: bytes) -> None:
        """On a gRPC Python stream's reader thread: one answer to ``attempt``."""
        outcome = self.outcome_of(attempt, response)
        if not attempt.step.deliver(attempt, outcome):
            self.after_step(attempt, outcome)

    def on_error(self, attempt: _Attempt, error: BaseException) -> None:
        """On a gRPC Python stream's reader thread: ``attempt`` will get no answer."""
        self.arrived(None)
        if not attempt.step.deliver(attempt, error):
            self.after_step(attempt, error)

    def after_step(self, attempt: _Attempt, outcome) -> None:
        """An outcome that came after its step moved on: a hedge that lost the race, a search
        that was given up, or one on a stream this client cancelled."""
        if attempt.late:
            self.owe(-1)
        if isinstance(outcome, _SearchPortDown):
            return  # the port's failure, counted as a fallback: not the endpoint's
        if not isinstance(outcome, BaseException) or isinstance(outcome, _OlderServer):
            self.succeeded()  # it works (and its latency was recorded): worth a probe
        elif (attempt.call.result is not None or attempt.call.probe) \
                and _reason(outcome) != "CANCELLED":
            self.failed(outcome)  # a probe, or a hedge's loser, that failed

    def succeeded(self) -> None:
        self.ejection.on_success()
        if self.ejection.state is EjectionState.EJECTED:
            self.ejection.probe_now()

    def failed(self, error: BaseException | None) -> None:
        """A failed search (``None``: it was late)."""
        reason = "late" if error is None else _reason(error)
        with self._lock:
            self.counts[f"failures_{reason}"] += 1
        self._metrics.failures.add(1, {**self.attributes, "reason": reason})
        if isinstance(error, grpc.RpcError) and error.code() in _FATAL:
            return  # the request's fault, not the endpoint's
        if self.ejection.on_failure():
            with self._lock:
                self.counts["ejections"] += 1
            self._metrics.ejections.add(1, self.attributes)
            log.info("%s ejected for %.2f s after %d failures (last: %s)", self.address,
                     self.ejection.until - self._now(), self.ejection.consecutive_failures,
                     reason)

    # --- the search port ------------------------------------------------------------------------

    def set_search_port(self, port: int) -> None:
        """The search port its ``Info`` reported (0: none); with the pool's lock held."""
        if port > 65535:
            log.warning("%s reports search port %d, which is no TCP port: ignored, searching"
                        " on the main port", self.address, port)
            port = 0
        address = self._dial.with_port(port) if port and self._use_search_port else None
        if address is None or address == self.address:
            port = 0
        if port == self.search_port:
            return
        old = self._search_channel
        channel, open_streams = self._search_streams(address, None) if port else (None, None)
        # One tuple, read whole by ``stream_route``: a port is never paired with another's streams.
        self._search_route = (port, open_streams)
        self.search_port, self._search_channel = port, channel
        self.search_port_down_until = None
        if port:
            log.info("%s searches on port %d", self.address, port)
        if isinstance(old, grpc.Channel):
            old.close()  # its streams end, and their searches go to the new port
        # (A native channel's streams end with the old port's server, or when closed.)

    def _search_streams(self, address: str, channel: grpc.Channel | None):
        """A channel for search streams to ``address``, and what opens a stream on it: the
        engine's native client (``NativeSearchChannel``), or gRPC Python (``channel`` if given)
        where that cannot dial the same way: a raw target (``unix:``), or TLS that trusts the
        system's roots, which the native client does not read."""
        r = self.pool.retriever
        tls = r._tls_files
        if not self.target.raw and (tls is None or tls[0] is not None):
            native = NativeSearchChannel(
                address, max_message_bytes=r._max_message_bytes,
                keepalive_time_s=r._keepalive_time_s, connect_timeout_s=_CONNECT_TIMEOUT_S,
                tls=None if tls is None else (*tls, self._server_name))
            return native, functools.partial(_NativeStream, native)
        channel = channel or _channel(address, self._credentials, self._channel_options)
        return channel, functools.partial(_Stream, _search_stream(channel))

    def stream_route(self) -> tuple[int, object]:
        """The port for a new stream (0: the main port), and what opens it (called with the
        endpoint, the port, the metadata and the tracer): the search port unless it failed
        lately."""
        (port, open_stream), down_until = self._search_route, self.search_port_down_until
        if not port or down_until is not None and self._now() < down_until:
            return self._main_route
        return port, open_stream

    def search_port_failed(self, port: int, error: BaseException) -> None:
        """A stream on the search port ended without this client ending it: search on the main
        port for a while."""
        with self._lock:
            if port != self.search_port:
                return  # a port reported earlier: its channel was closed
            first = self.search_port_down_until is None  # it worked (or was never tried)
            self.search_port_down_until = self._now() + self._search_port_retry_s
            self.counts["search_port_fallbacks"] += 1
        self._metrics.search_port_fallbacks.add(1, self.attributes)
        log.log(logging.WARNING if first else logging.DEBUG,
                "search port %d of %s failed (%s): searching on its main port, trying the search"
                " port again in %g s", port, self.address, _reason(error),
                self._search_port_retry_s)

    def search_port_answered(self, port: int) -> None:
        if self.search_port_down_until is not None and port == self.search_port:
            with self._lock:
                self.search_port_down_until = None
            log.info("search port %d of %s answers again", port, self.address)

    # --- health (gRPC A17) --------------------------------------------------------------------

    def watch(self, shards: Sequence[str]) -> None:
        """Follow the server's health, overall and for each of ``shards``."""
        for watch in self.watches:
            watch.close()
        r = self.pool.retriever
        names = [SERVICE_NAME] + [f"{SERVICE_NAME}/{shard}" for shard in shards]
        self.watches = [
            HealthWatch(self.channel, name, self._health_changed, metadata=r._metadata,
                        label=self.address)
            for name in names
        ]
        for watch in self.watches:  # once the list is complete: their answers read it
            watch.start()

    def _health_changed(self, watch: HealthWatch) -> None:
        with self._health_lock:  # one watch's thread at a time, each reading all the statuses
            self._update_health(watch)

    def _update_health(self, watch: HealthWatch) -> None:
        watches = list(self.watches)
        if not watches:
            return
        overall = watches[0].status
        before = self.health
        self.health = overall
        self.fully_serving = overall is Health.SERVING and all(
            w.status in (Health.SERVING, Health.SERVICE_UNKNOWN) for w in watches[1:]
        )
        if overall is Health.SERVING and before is not Health.SERVING:
            if self.ever_served:
                # Back after an outage (a restart, perhaps with other shards): probe it now
                # rather than at the end of its ejection, and ask its shards again.
                self.ejection.probe_now()
                self.info_stale = True
                self.pool.wake()
            self.ever_served = True
        if before is not overall:
            log.info("%s health: %s", self.address, overall.value)
        if watch is watches[0] and not self.health_answered:
            self.health_answered = True
            self.pool.notify()  # a search may wait for the first round (after the state above)

    def close(self) -> None:
        for watch in self.watches:
            watch.close()
        self.watches = []
        self.channel.close()
        if isinstance(self._search_channel, grpc.Channel):
            self._search_channel.close()


_INFO_BACKOFF_S = (0.1, 1.0)  # Info retries: from 100 ms, doubling, at most 1 s apart


def _search_stream(channel: grpc.Channel):
    """The SearchStream method of ``channel``; answers arrive as bytes: ``_ShardCall.convert``
    decodes them (levels natively)."""
    return channel.stream_stream(STREAM_METHOD,
                                 request_serializer=pb.SearchRequest.SerializeToString,
                                 response_deserializer=None)


class _ReplicaSet:
    """The endpoints that serve one set of shards, and that set's statistics."""

    def __init__(self, shards: tuple[str, ...], policy: ReplicaPolicy) -> None:
        self.shards = shards
        self.label = ",".join(shards)
        self.attributes = {"shard": self.label}
        self.endpoints: list[_Endpoint] = []
        self.stats = ShardStats(policy)
        self.answered = self.missed = self.hedges = self.failovers = self.overflow = 0

    def choose(self, tried: set, rng: random.Random) -> _Endpoint | None:
        """An endpoint for one more attempt: the cheaper of two random healthy ones that are not
        ejected (nor being probed), below their in-flight cap and not owing late answers;
        replicas with some shard out of service only when no replica serves them all."""
        for fully in (True, False):
            candidates = [e for e in self.endpoints if e not in tried and e.healthy(fully)
                          and e.below_cap() and not e.owes_late_answers()
                          and e.ejection.serving()]
            if candidates:
                return pick_two(candidates, _Endpoint.cost, rng)
        return None

    def probes(self) -> list[_Endpoint]:
        """Endpoints whose ejection is over and that are to be probed now."""
        return [e for e in self.endpoints if e.healthy(False) and e.ejection.claim_probe()]

    def at_capacity(self, tried: set) -> bool:
        """Whether some replica could have taken the search but for its in-flight cap."""
        return any(e not in tried and e.healthy(False) and not e.below_cap()
                   for e in self.endpoints)


class _Pool:
    """The endpoints of one retriever, grouped into replica sets, kept current by one
    maintenance thread (names resolved again, ``Info`` fetched and retried, health watched)."""

    def __init__(self, retriever: RemoteRetriever, discovery: Discovery,
                 resolve_interval_s: float) -> None:
        self.retriever = retriever
        self._discovery = discovery
        self._resolve_interval_s = resolve_interval_s
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._endpoints: dict[str, _Endpoint] = {}
        self._groups: dict[tuple[str, ...], _ReplicaSet] = {}
        self._routing: tuple[_ReplicaSet, ...] = ()
        self._reference: tuple[_Endpoint, DatastoreInfo] | None = None
        self._overlap: str | None = None
        self._resolved = not any(t.is_name for t in discovery.targets)
        self.settled = False  # the first round (Info, then health) is over: never reset
        self._resolve_now = not self._resolved
        self._wake = threading.Event()
        self._stopped = threading.Event()
        for address in discovery.addresses():
            self._add(address)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="retriever-client-pool")
        self._thread.start()

    # --- read by sessions and info() --------------------------------------------------------

    def routing(self) -> tuple[_ReplicaSet, ...]:
        """The replica sets a search goes to: disjoint, each with at least one endpoint."""
        return self._routing

    def wait_first_round(self, timeout: float, *, health: bool = False) -> bool:
        """Wait until names were resolved once and every endpoint answered ``Info`` or failed
        to (with ``health``: and said whether it serves), at most ``timeout`` seconds."""
        if health and self.settled:
            return True
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                done = self._resolved and all(
                    e.info_outcomes and (not health or e.info is None or e.incompatible
                                         or e.health_answered)
                    for e in self._endpoints.values()
                )
                if done and health:
                    self.settled = True
                left = deadline - time.monotonic()
                if done or left <= 0:
                    return done
                self._changed.wait(left)

    def notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def combined_info(self) -> DatastoreInfo:
        with self._lock:
            endpoints = list(self._endpoints.values())
            for e in endpoints:
                if e.incompatible:
                    raise IncompatibleEndpoints(e.incompatible)
            if self._overlap:
                raise IncompatibleEndpoints(self._overlap)
            groups = list(self._routing)
            if not groups:
                raise RetrieverUnavailable(self._unavailable_message(endpoints))
            infos = [next(e.info for e in g.endpoints if e.info is not None) for g in groups]
        first = infos[0]
        return DatastoreInfo(
            format_version=first.format_version,
            vocab_size=first.vocab_size,
            n_tokens=sum(i.n_tokens for i in infos),
            n_docs=sum(i.n_docs for i in infos),
            tokenizer_name=first.tokenizer_name,
            tokenizer_fingerprint=first.tokenizer_fingerprint,
            shards=tuple(s for g in groups for s in g.shards),
        )

    def _unavailable_message(self, endpoints: list[_Endpoint]) -> str:
        silent = f"no answer within {self.retriever.info_timeout_s:g} s"
        problems = [f"{e.address} did not answer Info ({e.info_error or silent})"
                    for e in endpoints]
        problems += [f"{t.text} cannot be resolved ({err})"
                     for t, err in self._discovery.errors.items()]
        if not problems:
            problems = [f"{t.text} resolves to no address" for t in self._discovery.targets]
        return (
            f"no retriever endpoint answered: {'; '.join(problems)}. Is retriever-server"
            " running there, with the same TLS and token settings? Searches start as soon as"
            " one answers."
        )

    def stats(self) -> dict:
        with self._lock:
            groups = {
                g.label: {"answered": g.answered, "missed": g.missed, "hedges": g.hedges,
                          "failovers": g.failovers, "overflow": g.overflow,
                          "endpoints": [e.address for e in g.endpoints]}
                for g in self._groups.values()
            }
            endpoints = {}
            for e in self._endpoints.values():
                with e._lock:
                    counts = dict(e.counts)
                endpoints[e.address] = {
                    "shards": e.group.label if e.group else None,
                    "health": e.health.value, "ejection": e.ejection.state.value,
                    "search_port": e.search_port, "on_search_port": e.stream_route()[0] != 0,
                    "in_flight": e.in_flight, "rtt_s": e.ewma.estimate(), **counts,
                }
        return {"shards": groups, "endpoints": endpoints}

    # --- maintenance ------------------------------------------------------------------------------

    def wake(self, resolve: bool = False) -> None:
        if resolve:
            self._resolve_now = True
        self._wake.set()

    def _run(self) -> None:
        next_resolve = 0.0
        while not self._stopped.is_set():
            t = time.monotonic()
            if self._resolve_now or (not self._resolved or t >= next_resolve) and \
                    any(target.is_name for target in self._discovery.targets):
                self._resolve_now = False
                added, removed = self._discovery.resolve()
                with self._changed:
                    for address in added:
                        self._add(address)
                    for address in removed:
                        self._remove(address)
                    self._resolved = True
                    self._regroup()
                    self._changed.notify_all()
                next_resolve = t + self._resolve_interval_s
            wait = next_resolve - t if next_resolve else self._resolve_interval_s
            with self._lock:
                endpoints = list(self._endpoints.values())
            for e in endpoints:
                if e.info_in_flight or not (e.info is None or e.info_stale):
                    continue
                if e.info_retry_at <= t:
                    self._fetch_info(e)
                else:
                    wait = min(wait, e.info_retry_at - t)
            self._wake.wait(max(wait, 0.001))
            self._wake.clear()

    def _fetch_info(self, endpoint: _Endpoint) -> None:
        endpoint.info_in_flight = True
        endpoint.info_stale = False
        r = self.retriever
        future = endpoint.info_stub.Info.future(
            pb.InfoRequest(), timeout=r.info_timeout_s, metadata=r._metadata
        )
        future.add_done_callback(lambda f: self._info_done(endpoint, f))

    def _info_done(self, endpoint: _Endpoint, future) -> None:
        """On a gRPC thread: an ``Info`` answer or error."""
        try:
            response = future.result()
            info = wire.datastore_info(response)
        except grpc.RpcError as exc:
            info, error = None, f"{exc.code().name}: {exc.details()}"
        except Exception as exc:  # noqa: BLE001 - cancelled at close, or a malformed answer
            info, error = None, f"{type(exc).__name__}: {exc}"
        with self._changed:
            endpoint.info_in_flight = False
            endpoint.info_outcomes += 1
            if endpoint.removed or self._stopped.is_set():
                return
            if info is None:
                endpoint.info_error = error
                endpoint.info_retry_at = time.monotonic() + endpoint.info_backoff_s * \
                    random.uniform(0.8, 1.2)
                endpoint.info_backoff_s = min(endpoint.info_backoff_s * 2, _INFO_BACKOFF_S[1])
                log.debug("Info from %s failed: %s", endpoint.address, error)
            else:
                endpoint.info_error = None
                endpoint.info_backoff_s = _INFO_BACKOFF_S[0]
                endpoint.incompatible = self._check_identity(endpoint, info)
                if endpoint.incompatible:
                    log.warning("%s; not using it", endpoint.incompatible)
                shards_changed = endpoint.info is None or endpoint.info.shards != info.shards
                endpoint.info = info
                endpoint.set_search_port(response.search_port)
                if shards_changed and not endpoint.incompatible:
                    endpoint.watch(info.shards)
                self._regroup()
            self._changed.notify_all()
        self._wake.set()

    def _check_identity(self, endpoint: _Endpoint, info: DatastoreInfo) -> str | None:
        """Why ``endpoint`` cannot be used with the others (another datastore), or ``None``."""
        if self._reference is None or self._reference[0] is endpoint \
                or self._reference[0].removed:
            self._reference = (endpoint, info)
            return None
        other, reference = self._reference
        for name in ("tokenizer_fingerprint", "vocab_size", "format_version"):
            if getattr(info, name) != getattr(reference, name):
                return (
                    f"{endpoint.address} serves a datastore with {name}={getattr(info, name)!r},"
                    f" but {other.address} has {getattr(reference, name)!r}: point the client at"
                    " shards of one datastore"
                )
        return None

    def _add(self, address: Address) -> None:
        if address.dial not in self._endpoints:
            self._endpoints[address.dial] = _Endpoint(self, address)

    def _remove(self, address: Address) -> None:
        endpoint = self._endpoints.pop(address.dial, None)
        if endpoint is not None:
            endpoint.removed = True
            endpoint.close()
            log.info("%s no longer resolves from %s: removed", endpoint.address,
                     address.target.text)

    def _regroup(self) -> None:
        """Replica sets from the endpoints' shards (called with the lock held); a set that
        overlaps an earlier one is left out, and named by ``info()``."""
        members: dict[tuple[str, ...], list[_Endpoint]] = {}
        for e in self._endpoints.values():
            if e.info is not None and not e.incompatible and e.info.shards:
                members.setdefault(e.info.shards, []).append(e)
        routing: list[_ReplicaSet] = []
        covered: dict[str, _ReplicaSet] = {}
        self._overlap = None
        for shards, endpoints in members.items():
            group = self._groups.get(shards)
            if group is None:
                group = self._groups[shards] = _ReplicaSet(shards, self.retriever.policy)
            group.endpoints = endpoints
            for e in endpoints:
                if e.group is not group:
                    e.set_group(group)
            clash = next((covered[s] for s in shards if s in covered), None)
            if clash is not None:
                self._overlap = (
                    f"endpoints {[e.address for e in endpoints]} serve shards {list(shards)}"
                    f" and {[e.address for e in clash.endpoints]} serve {list(clash.shards)}:"
                    " these overlap, and their counts would be added twice; endpoints that"
                    " serve the same shards are replicas, others must serve disjoint shards"
                )
                log.warning("%s; leaving the first out", self._overlap)
                continue
            for s in shards:
                covered[s] = group
            routing.append(group)
        self._routing = tuple(routing)

    def close(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join()
        with self._lock:
            endpoints = list(self._endpoints.values())
        for endpoint in endpoints:
            endpoint.close()


class _Metrics:
    """The client's OpenTelemetry instruments, made once per retriever."""

    BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                 0.1, 0.25, 0.5, 1.0)

    def __init__(self, meter_provider) -> None:
        meter = metrics.get_meter(INSTRUMENTATION_NAME, meter_provider=meter_provider)
        prefix = "rest.retriever.client"
        self._duration = meter.create_histogram(
            f"{prefix}.attempt.duration", unit="s",
            description="Latency of one search attempt on one endpoint, answered",
            explicit_bucket_boundaries_advisory=self.BUCKETS_S,
        )
        self.attempts = meter.create_counter(
            f"{prefix}.attempts", description="Searches sent to an endpoint, by kind: first,"
            " failover (after an error) or hedge (after its shard's recent p95)")
        self.failures = meter.create_counter(
            f"{prefix}.failures", description="Attempts that gave no answer, by reason: a gRPC"
            " status, late, or invalid (an answer that breaks the contract)")
        self.ejections = meter.create_counter(
            f"{prefix}.ejections", description="Endpoints ejected after consecutive failures")
        self.overflow = meter.create_counter(
            f"{prefix}.overflow", description="Searches not sent because every replica had its"
            " in-flight cap reached")
        self.shard_misses = meter.create_counter(
            f"{prefix}.shard_misses", description="Steps that went on without a shard's answer")
        self.search_port_fallbacks = meter.create_counter(
            f"{prefix}.search_port.fallbacks", description="Search streams on an endpoint's"
            " search port that failed, their searches sent again on its main port")

    def add_sample(self, latency: float, attributes: dict) -> None:
        self._duration.record(latency, attributes)


def _reason(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return error.code().name
    if isinstance(error, InvalidAnswer):
        return "invalid"
    return type(error).__name__


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


def _tls_files(tls: bool, ca_file, cert_file, key_file) -> tuple | None:
    """The (CA, certificate, key) PEMs of a TLS client (each ``None`` when not given), or
    ``None`` without TLS."""
    if not tls:
        return None
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both tls_cert_file and tls_key_file")

    def read(path):
        return Path(path).read_bytes() if path else None

    return read(ca_file), read(cert_file), read(key_file)
