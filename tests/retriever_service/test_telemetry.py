"""Tracing across the call, per-search spans and latency histograms, exporters from OTEL_*."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rest.types import SearchParams
from retriever_service.client import RemoteRetriever
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.telemetry import providers_from_env
from tests.retriever_service.service_testing import wait_until

STREAM_SPAN = "/rest.retriever.v1.Retriever/SearchStream"


def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    return exporter, provider, reader, MeterProvider(metric_readers=[reader])


def histogram_count(reader: InMemoryMetricReader, name: str) -> int:
    data = reader.get_metrics_data()
    return sum(point.count
               for resource in data.resource_metrics for scope in resource.scope_metrics
               for metric in scope.metrics if metric.name == name
               for point in metric.data.data_points)


def test_trace_context_crosses_the_call_and_each_search_is_recorded(
    datastore, datastore_dir, documents
):
    server_spans, server_tracing, server_metrics, server_meter = traced()
    client_spans, client_tracing, client_metrics, client_meter = traced()
    config = ServerConfig(datastore=str(datastore_dir), port=0)
    contexts = [documents[0][:20], documents[1][:9], [60, 61]]  # the last one matches nothing
    with BackgroundServer(config, datastore, tracer_provider=server_tracing,
                          meter_provider=server_meter) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5,
                            tracer_provider=client_tracing, meter_provider=client_meter) as rr:
        rr.info()
        tracer = client_tracing.get_tracer("test")
        with tracer.start_as_current_span("generate") as generation:
            with rr.session() as session:
                results = [session.search(c, SearchParams()) for c in contexts]
        trace_id = generation.get_span_context().trace_id
        # The server ends its stream span when the stream ends, just after the client closed it.
        assert wait_until(lambda: any(s.name == STREAM_SPAN
                                      for s in server_spans.get_finished_spans()))

    client_by_name = {}
    for span in client_spans.get_finished_spans():
        client_by_name.setdefault(span.name, []).append(span)
    client_stream = client_by_name[STREAM_SPAN][0]
    server_stream = next(s for s in server_spans.get_finished_spans() if s.name == STREAM_SPAN)
    assert server_stream.kind == trace.SpanKind.SERVER
    assert server_stream.context.trace_id == trace_id  # propagated across the call
    assert server_stream.parent.span_id == client_stream.context.span_id

    server_searches = [s for s in server_spans.get_finished_spans()
                       if s.name == "rest.retriever.search"]
    client_searches = client_by_name["rest.retriever.search"]
    assert len(server_searches) == len(client_searches) == len(contexts)
    for span in server_searches:
        assert span.context.trace_id == trace_id
        assert span.parent.span_id == server_stream.context.span_id
    for side in (server_searches, client_searches):
        for span, result in zip(side, results):
            assert span.attributes["rest.match_length"] == result.match_length
            assert span.attributes["rest.occurrences"] == result.occurrences
            assert span.attributes["rest.nodes"] == len(result)
            assert span.attributes["rest.shard"] == result.shard
            assert span.attributes["rest.latency_ms"] > 0
    assert all(s.context.trace_id == trace_id for s in client_searches)

    assert histogram_count(server_metrics, "rest.retriever.server.search.duration") == 3
    assert histogram_count(client_metrics, "rest.retriever.client.search.duration") == 3


def test_a_failed_search_is_an_error_span(datastore, datastore_dir):
    server_spans, server_tracing, _, _ = traced()
    client_spans, client_tracing, _, _ = traced()
    config = ServerConfig(datastore=str(datastore_dir), port=0)
    with BackgroundServer(config, datastore, tracer_provider=server_tracing) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5,
                            tracer_provider=client_tracing) as rr, rr.session() as session:
        assert session.search([1, 1000], SearchParams()) is None
    (client_search,) = [s for s in client_spans.get_finished_spans()
                        if s.name == "rest.retriever.search"]
    assert not client_search.status.is_ok
    assert wait_until(lambda: any(s.name == "rest.retriever.search"
                                  for s in server_spans.get_finished_spans()))
    (server_search,) = [s for s in server_spans.get_finished_spans()
                        if s.name == "rest.retriever.search"]
    assert server_search.attributes["rest.error"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(("value", "traces"), [(None, False), ("none", False),
                                                ("console", True), ("otlp", True)])
def test_exporters_come_from_the_environment(monkeypatch, value, traces):
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    if value is None:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    providers = providers_from_env("test")
    assert (providers.tracer_provider is not None) == traces
    assert providers.meter_provider is None
    providers.shutdown()


def test_an_unknown_exporter_is_an_error(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        providers_from_env("test")


def test_server_process_exports_search_spans_to_the_console(server_process, datastore_dir):
    server = server_process("--datastore", str(datastore_dir),
                            env={"OTEL_TRACES_EXPORTER": "console",
                                 "OTEL_METRICS_EXPORTER": "none"})
    with RemoteRetriever(server.address, deadline_s=5) as retriever, \
            retriever.session() as session:
        assert session.search([1, 2, 3], SearchParams()) is not None
    server.terminate()
    assert server.wait() == 0
    out, _ = server.output()
    assert '"name": "rest.retriever.search"' in out
    assert '"rest.match_length"' in out
