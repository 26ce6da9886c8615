"""OpenTelemetry for the retrieval service: exporters from the environment, and per-search records.

The gRPC instrumentation (``opentelemetry-instrumentation-grpc``) gives one span per RPC, and a
stream is one RPC for a whole generation session. ``SearchTelemetry`` adds what a stream span
cannot show: one span per search, with the match length, occurrences, tree size, shard and
latency; a latency histogram with buckets for a value in seconds (10 us to 10 s), counters of
requests and of errors by status, and, on the server, rejections by reason and searches in flight.

A search's span on the server is a child of the client's span for that search, even inside a
stream: the client stamps its span's W3C trace context on the request
(``SearchRequest.trace_context``, ``SearchRecord.stamp``) and the server continues it
(``search_context``). A decoder that makes its generation's span current while it drafts
(``decoder.tracing``) thus gets one trace per generation: the generation, its searches, the
server's spans for them.

Exporters follow the OpenTelemetry SDK's own variables, read by the SDK's own code (its
``_configuration`` module, the one ``opentelemetry-instrument`` uses), so that every exporter and
protocol installed is available, with the SDK's meaning:

    OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER, OTEL_LOGS_EXPORTER
        comma-separated names of installed exporters: otlp, otlp_proto_grpc, otlp_proto_http,
        console, prometheus (metrics), none; unset means none
    OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_EXPORTER_OTLP_{TRACES,METRICS,LOGS}_PROTOCOL
        grpc (the default) or http/protobuf, for ``otlp``
    OTEL_EXPORTER_OTLP_*, OTEL_EXPORTER_PROMETHEUS_HOST/PORT, OTEL_METRIC_EXPORT_INTERVAL,
    OTEL_BSP_*: read by the exporters and processors themselves
    OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG, OTEL_PYTHON_ID_GENERATOR
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES (the service name defaults to the program's)
    OTEL_SDK_DISABLED=true turns all of it off

Nothing is exported by default, so a plain run pays (almost) nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from rest.types import SearchResult

INSTRUMENTATION_NAME = "retriever_service"
SIGNALS = {"traces": "OTEL_TRACES_EXPORTER", "metrics": "OTEL_METRICS_EXPORTER",
           "logs": "OTEL_LOGS_EXPORTER"}
# A search takes from about 10 us (in process, small datastore) to the client's deadline (tens of
# milliseconds) and, for a pathological request, seconds: 1-2.5-5 steps from 10 us to 10 s.
LATENCY_BUCKETS_S = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


@dataclass(frozen=True)
class Providers:
    """The SDK providers built from the environment; ``None`` where nothing is exported."""

    tracer_provider: object | None
    meter_provider: object | None
    logger_provider: object | None = None

    def shutdown(self) -> None:
        """Flush what is buffered (batch processors, periodic metric readers)."""
        for provider in (self.tracer_provider, self.meter_provider, self.logger_provider):
            if provider is not None:
                provider.shutdown()


def sdk_disabled() -> bool:
    return os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def _exporter_classes() -> dict[str, dict]:
    """The exporter classes the ``OTEL_*_EXPORTER`` variables name, by signal, resolved by the
    SDK (protocol variables included); a ``ValueError`` naming the variable when one is wrong."""
    from opentelemetry.sdk._configuration import _get_exporter_names, _import_exporters

    names = {}
    for signal, variable in SIGNALS.items():
        try:
            names[signal] = [n for n in _get_exporter_names(signal) if n != "none"]
        except RuntimeError as exc:  # an unknown OTLP protocol
            raise ValueError(f"{variable}: {exc}") from None
    try:
        traces, metric, logs = _import_exporters(names["traces"], names["metrics"], names["logs"])
    except RuntimeError as exc:
        given = ", ".join(f"{v}={os.environ[v]!r}" for v in SIGNALS.values() if v in os.environ)
        raise ValueError(f"{exc} ({given}); installed exporters: {installed_exporters()}") from None
    return {"traces": traces, "metrics": metric, "logs": logs}


def installed_exporters() -> str:
    from opentelemetry.util._importlib_metadata import entry_points

    found = []
    for signal in SIGNALS:
        group = entry_points(group=f"opentelemetry_{signal}_exporter")
        found.append(f"{signal}: otlp, " + ", ".join(sorted(e.name for e in group)))
    return "; ".join(found)


def resource_for(default_service_name: str):
    """The SDK's resource from ``OTEL_RESOURCE_ATTRIBUTES``/``OTEL_SERVICE_NAME``, with
    ``default_service_name`` when neither names the service."""
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource

    named = SERVICE_NAME in OTELResourceDetector().detect().attributes
    return Resource.create({} if named else {SERVICE_NAME: default_service_name})


def providers_from_env(default_service_name: str, *, prometheus: bool = False) -> Providers:
    """Tracer, meter and logger providers for the exporters that the ``OTEL_*`` variables name.

    ``prometheus``: also give the meter provider a Prometheus reader (for a ``/metrics``
    endpoint served with ``prometheus_client``; see ``serve_prometheus``), unless the variables
    already asked for one. Raises ``ValueError`` for a variable the SDK cannot satisfy.
    """
    if sdk_disabled():
        return Providers(None, None, None)
    exporters = _exporter_classes()
    wants_prometheus = prometheus and not any(
        _is_prometheus_reader(c) for c in exporters["metrics"].values()
    )
    if not any(exporters.values()) and not wants_prometheus:
        return Providers(None, None, None)
    resource = resource_for(default_service_name)
    return Providers(
        _tracer_provider(exporters["traces"], resource) if exporters["traces"] else None,
        _meter_provider(exporters["metrics"], resource, wants_prometheus)
        if exporters["metrics"] or wants_prometheus else None,
        _logger_provider(exporters["logs"], resource) if exporters["logs"] else None,
    )


def _is_prometheus_reader(exporter_class) -> bool:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        return False
    return issubclass(exporter_class, PrometheusMetricReader)


def _tracer_provider(exporters: Mapping[str, type], resource):
    from opentelemetry.sdk._configuration import (
        _get_id_generator,
        _get_sampler,
        _import_id_generator,
        _import_sampler,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=resource,
        sampler=_import_sampler(_get_sampler()),
        id_generator=_import_id_generator(_get_id_generator()),
    )
    for exporter_class in exporters.values():
        provider.add_span_processor(BatchSpanProcessor(exporter_class()))
    return provider


def _meter_provider(exporters: Mapping[str, type], resource, prometheus: bool):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader

    readers = [
        cls() if issubclass(cls, MetricReader) else PeriodicExportingMetricReader(cls())
        for cls in exporters.values()
    ]
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())  # registers with prometheus_client's registry
    return MeterProvider(resource=resource, metric_readers=readers)


def _logger_provider(exporters: Mapping[str, type], resource):
    """Log records of this process's Python logging, exported (the SDK's logs signal)."""
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    provider = LoggerProvider(resource=resource)
    for exporter_class in exporters.values():
        provider.add_log_record_processor(BatchLogRecordProcessor(exporter_class()))
    logging.getLogger().addHandler(LoggingHandler(logger_provider=provider))
    return provider


def install_from_env(default_service_name: str) -> Providers:
    """``providers_from_env``, installed as the global providers (for an application, such as
    ``rest generate``, whose libraries use the global ones); call ``shutdown`` before exiting."""
    providers = providers_from_env(default_service_name)
    if providers.tracer_provider is not None:
        trace.set_tracer_provider(providers.tracer_provider)
    if providers.meter_provider is not None:
        metrics.set_meter_provider(providers.meter_provider)
    return providers


def serve_prometheus(host: str, port: int):
    """Serve ``/metrics`` (prometheus_client's registry, where the Prometheus reader of
    ``providers_from_env(prometheus=True)`` registers) on ``host:port`` in a thread; returns the
    HTTP server (``server_address`` has the bound port; ``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    httpd, _thread = start_http_server(port, addr=host)
    return httpd


class SearchTelemetry:
    """One span, one latency sample and request/error counts per search, on the client or the
    server side.

    ``tracer_provider``/``meter_provider`` of ``None`` mean the global ones (no-ops unless the
    application installed an SDK), as OpenTelemetry asks of libraries.
    """

    def __init__(self, side: str, tracer_provider=None, meter_provider=None) -> None:
        assert side in ("client", "server"), side
        self._span_kind = SpanKind.CLIENT if side == "client" else SpanKind.INTERNAL
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        meter = metrics.get_meter(INSTRUMENTATION_NAME, meter_provider=meter_provider)
        prefix = f"rest.retriever.{side}"
        self._meter = meter
        self._prefix = prefix
        self._latency = meter.create_histogram(
            f"{prefix}.search.duration",
            unit="s",
            description=f"Latency of one search as seen by the {side}",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        # Counters are plain integers read when metrics are collected (observable counters):
        # an SDK counter's add costs about 9 us, paid on every search; a dict increment, not.
        self._counts = _Counts()
        self._counter(f"{prefix}.requests", "requests",
                      f"Searches the {side} handled, answered or not")
        self._counter(f"{prefix}.errors", "errors",
                      "Searches that ended in an error, by gRPC status (or exception type)")
        if side == "server":
            self._counter(f"{prefix}.rejections", "rejections",
                          "Requests refused before a search: overloaded, deadline passed, "
                          "unauthenticated")

    def _counter(self, name: str, table: str, description: str) -> None:
        from opentelemetry.metrics import Observation

        counts = self._counts

        def observe(options):
            return [Observation(n, dict(key)) for key, n in counts.snapshot(table)]

        self._meter.create_observable_counter(name, callbacks=[observe], unit="{request}",
                                              description=description)

    def search(self, method: str, context=None) -> _SearchScope:
        """``with telemetry.search(method) as record:`` times the block and records its outcome
        (set ``record.result``); ``context`` is the parent span's context (default: the current
        one)."""
        return _SearchScope(self, method, context)

    def rejected(self, reason: str) -> None:
        self._counts.add("rejections", (("reason", reason),))

    def add_counts(self, stats: Callable[[], dict]) -> None:
        """Counts kept elsewhere, added to this telemetry's requests, errors and rejections when
        metrics are collected: ``stats()`` gives ``{"requests": {method: n}, "errors":
        {(method, status name): n}, "rejections": {reason: n}}`` (the native search port's
        counters, ``NativeSearchServer.stats``), the same series as the searches counted here."""
        self._counts.sources.append(stats)

    def observe_in_flight(self, count: Callable[[], int]) -> None:
        """Report ``count()`` as the searches in flight, read when metrics are collected."""
        from opentelemetry.metrics import Observation

        self._meter.create_observable_gauge(
            f"{self._prefix}.searches.in_flight", unit="{search}",
            description="Searches admitted and not yet answered",
            callbacks=[lambda options: [Observation(count())]],
        )


def search_context(carrier: Mapping[str, str]):
    """The OpenTelemetry context that a request's trace fields continue (``None``: none sent)."""
    return propagate.extract(carrier) if carrier else None


class _Counts:
    """Cumulative counts by table and attribute tuple, for observable counters; a lock, as
    client sessions count from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[tuple, int]] = {}
        self.sources: list[Callable[[], dict]] = []  # see SearchTelemetry.add_counts

    def add(self, table: str, key: tuple) -> None:
        with self._lock:
            counts = self._tables.setdefault(table, {})
            counts[key] = counts.get(key, 0) + 1

    def snapshot(self, table: str) -> list[tuple[tuple, int]]:
        with self._lock:
            counts = dict(self._tables.get(table, {}))
        for source in self.sources:
            for key, n in source().get(table, {}).items():
                key = _source_key(table, key)
                counts[key] = counts.get(key, 0) + n
        return list(counts.items())


def _source_key(table: str, key) -> tuple:
    """A key of ``SearchTelemetry.add_counts``' tables as the attributes of the same series."""
    if table == "requests":
        return (("rpc.method", key),)
    if table == "errors":
        return (("rpc.method", key[0]), ("error", key[1]))
    return (("reason", key),)


class NativeLatencyCollector:
    """A ``prometheus_client`` collector of the native search port's latency histogram
    (``NativeSearchServer.stats()["latency"]``, the buckets of ``LATENCY_BUCKETS_S``), as
    ``rest_retriever_server_search_port_duration_seconds{rpc_method, outcome}``: the
    OpenTelemetry histogram takes only samples recorded from Python, which the native port
    never makes."""

    NAME = "rest_retriever_server_search_port_duration_seconds"

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily

        stats = self._stats()
        family = HistogramMetricFamily(
            self.NAME, "Latency of one search on the native search port (--search-port)",
            labels=["rpc_method", "outcome"])
        bounds = stats["buckets"]
        for (method, outcome), (counts, total, _count) in sorted(stats["latency"].items()):
            cumulative, buckets = 0, []
            for bound, n in zip([*map(repr, bounds), "+Inf"], counts):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric([method, outcome], buckets, sum_value=total)
        yield family

    def describe(self):
        return []


class _SearchScope:
    """One search's span and latency sample. The span is not made the current one: nothing is
    traced inside a search, and attaching and detaching a context cost more than the rest of a
    no-op telemetry (a search is timed on every decoding step)."""

    __slots__ = ("_telemetry", "_method", "_context", "_record", "_span", "_start")

    def __init__(self, telemetry: SearchTelemetry, method: str, context) -> None:
        self._telemetry = telemetry
        self._method = method
        self._context = context

    def __enter__(self) -> SearchRecord:
        self._span = self._telemetry._tracer.start_span(
            "rest.retriever.search",
            context=self._context,
            kind=self._telemetry._span_kind,
            attributes={"rpc.method": self._method},
        )
        self._record = SearchRecord(self._span)
        self._start = time.perf_counter()
        return self._record

    def __exit__(self, exc_type, exc, tb) -> None:
        latency = time.perf_counter() - self._start
        record = self._record
        if exc is not None:
            record.error = error_kind(exc)
        telemetry = self._telemetry
        method = ("rpc.method", self._method)
        telemetry._counts.add("requests", (method,))
        if record.error:
            telemetry._counts.add("errors", (method, ("error", record.error)))
        telemetry._latency.record(
            latency, {"rpc.method": self._method, "outcome": "error" if record.error else "ok"})
        span = self._span
        if span.is_recording():
            _annotate(span, record, latency)
        span.end()


def error_kind(exc: BaseException) -> str:
    """A gRPC status name (``UNAVAILABLE``) for an RPC error or a refused request, else the
    exception's type (``TimeoutError``)."""
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        try:
            code = code()
        except Exception:  # noqa: BLE001 - a call object in an odd state
            code = None
    return code.name if hasattr(code, "name") else type(exc).__name__


class SearchRecord:
    """What the traced block found out: the result, or the error that replaced it; and the
    search's span (``trace_context`` puts it in a request)."""

    __slots__ = ("result", "error", "span")

    def __init__(self, span=None) -> None:
        # One search's result, or a list of them (one per back-off level, longest match first).
        self.result: SearchResult | list[SearchResult] | None = None
        self.error: str | None = None
        self.span = span

    def stamp(self, request) -> None:
        """Put the span's W3C trace context on ``request`` (a ``SearchRequest``), so that the
        server's span for it is this span's child; nothing when the span is not recorded, so an
        untraced search sends nothing more."""
        if self.span is not None and self.span.is_recording():
            propagate.inject(request.trace_context, context=trace.set_span_in_context(self.span))


def _annotate(span, record: SearchRecord, latency: float) -> None:
    span.set_attribute("rest.latency_ms", latency * 1e3)
    if record.error:
        span.set_status(Status(StatusCode.ERROR, record.error))
        span.set_attribute("rest.error", record.error)
    elif record.result is not None:
        result = record.result
        if isinstance(result, list):  # every back-off level: the longest match describes it
            span.set_attribute("rest.levels", len(result))
            if not result:
                return
            result = result[0]
        span.set_attribute("rest.match_length", result.match_length)
        span.set_attribute("rest.occurrences", result.occurrences)
        span.set_attribute("rest.nodes", len(result.tokens))
        span.set_attribute("rest.shard", result.shard)
