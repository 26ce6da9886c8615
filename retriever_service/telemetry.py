"""OpenTelemetry for the retrieval service: exporters from the environment, and per-search records.

The gRPC instrumentation (``opentelemetry-instrumentation-grpc``) gives one span per RPC, and a
stream is one RPC for a whole generation session. ``SearchTelemetry`` adds what a stream span
cannot show: one span per search, a child of the current span, with the match length,
occurrences, tree size, shard and latency, and a latency histogram.

Exporters follow the standard variables, with ``none`` as the default so that a plain run exports
nothing and pays (almost) nothing:

    OTEL_TRACES_EXPORTER   otlp | console | none (comma-separated for several)
    OTEL_METRICS_EXPORTER  otlp | console | none
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_* (read by the SDK itself)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from rest.types import SearchResult

INSTRUMENTATION_NAME = "retriever_service"
EXPORTER_CHOICES = ("otlp", "console", "none")


@dataclass(frozen=True)
class Providers:
    """The SDK providers built from the environment; ``None`` where nothing is exported."""

    tracer_provider: object | None
    meter_provider: object | None

    def shutdown(self) -> None:
        """Flush what is buffered (the batch span processor, the periodic metric reader)."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


def _exporter_names(variable: str) -> list[str]:
    names = [n.strip() for n in os.environ.get(variable, "none").split(",") if n.strip()]
    for name in names:
        if name not in EXPORTER_CHOICES:
            raise ValueError(f"{variable}={name!r}: expected one of {', '.join(EXPORTER_CHOICES)}")
    return [n for n in names if n != "none"]


def providers_from_env(default_service_name: str) -> Providers:
    """Tracer and meter providers for the exporters named by ``OTEL_*_EXPORTER``."""
    trace_exporters = _exporter_names("OTEL_TRACES_EXPORTER")
    metric_exporters = _exporter_names("OTEL_METRICS_EXPORTER")
    if not trace_exporters and not metric_exporters:
        return Providers(None, None)

    from opentelemetry.sdk.resources import OTEL_SERVICE_NAME, Resource

    resource = Resource.create(
        {} if os.environ.get(OTEL_SERVICE_NAME) else {"service.name": default_service_name}
    )
    return Providers(
        _tracer_provider(trace_exporters, resource) if trace_exporters else None,
        _meter_provider(metric_exporters, resource) if metric_exporters else None,
    )


def _tracer_provider(names: list[str], resource):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


def _meter_provider(names: list[str], resource):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )

    readers = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        else:
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    return MeterProvider(resource=resource, metric_readers=readers)


class SearchTelemetry:
    """One span and one histogram sample per search, on the client or the server side.

    ``tracer_provider``/``meter_provider`` of ``None`` mean the global ones (no-ops unless the
    application installed an SDK), as OpenTelemetry asks of libraries.
    """

    def __init__(self, side: str, tracer_provider=None, meter_provider=None) -> None:
        assert side in ("client", "server"), side
        self._span_kind = SpanKind.CLIENT if side == "client" else SpanKind.INTERNAL
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        meter = metrics.get_meter(INSTRUMENTATION_NAME, meter_provider=meter_provider)
        self._latency = meter.create_histogram(
            f"rest.retriever.{side}.search.duration",
            unit="s",
            description=f"Latency of one search as seen by the {side}",
        )

    def search(self, method: str, context=None) -> _SearchScope:
        """``with telemetry.search(method) as record:`` times the block and records its outcome
        (set ``record.result``); ``context`` overrides the parent span."""
        return _SearchScope(self, method, context)


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
        self._record = SearchRecord()
        self._span = self._telemetry._tracer.start_span(
            "rest.retriever.search",
            context=self._context,
            kind=self._telemetry._span_kind,
            attributes={"rpc.method": self._method},
        )
        self._start = time.perf_counter()
        return self._record

    def __exit__(self, exc_type, exc, tb) -> None:
        latency = time.perf_counter() - self._start
        record = self._record
        if exc is not None:
            # A refused request carries its gRPC status code; anything else, its type.
            code = getattr(exc, "code", None)
            record.error = code.name if hasattr(code, "name") else type(exc).__name__
        outcome = "error" if record.error else "ok"
        self._telemetry._latency.record(latency, {"rpc.method": self._method, "outcome": outcome})
        span = self._span
        if span.is_recording():
            _annotate(span, record, latency)
        span.end()


@dataclass
class SearchRecord:
    """What the traced block found out: the result, or the error that replaced it."""

    result: SearchResult | None = None
    error: str | None = None


def _annotate(span, record: SearchRecord, latency: float) -> None:
    span.set_attribute("rest.latency_ms", latency * 1e3)
    if record.error:
        span.set_status(Status(StatusCode.ERROR, record.error))
        span.set_attribute("rest.error", record.error)
    elif record.result is not None:
        result = record.result
        span.set_attribute("rest.match_length", result.match_length)
        span.set_attribute("rest.occurrences", result.occurrences)
        span.set_attribute("rest.nodes", len(result.tokens))
        span.set_attribute("rest.shard", result.shard)
