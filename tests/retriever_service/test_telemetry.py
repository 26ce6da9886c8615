"""Tracing across the call, per-search spans, metrics (buckets, counters, in flight, Prometheus
text on --metrics-port), exporters from OTEL_* as the OpenTelemetry SDK reads them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.client import RemoteRetriever
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.telemetry import LATENCY_BUCKETS_S, Providers, providers_from_env
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import (
    ROOT,
    GatedDatastore,
    free_port,
    random_contexts,
    wait_until,
)

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
    for span, client_search in zip(server_searches, client_searches):
        assert span.context.trace_id == trace_id
        # Each search on the server is a child of the client's span for it, though all of them
        # travelled on one stream (the request carries the client span's context).
        assert span.parent.span_id == client_search.context.span_id
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


@pytest.fixture
def otel_env(monkeypatch):
    """No OTEL_* variable from the surroundings; ``otel_env(NAME=value, ...)`` sets some."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)

    def set_variables(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_variables


def span_exporters(provider) -> list[type]:
    # The SDK keeps its processors in a private multi-processor: read them to check the choice.
    processors = provider._active_span_processor._span_processors
    return [type(p.span_exporter) for p in processors]


def metric_readers(provider) -> list:
    return list(provider._sdk_config.metric_readers)


@pytest.mark.parametrize(("value", "traces"), [(None, False), ("none", False),
                                                ("console", True), ("otlp", True)])
def test_exporters_come_from_the_environment(otel_env, value, traces):
    if value is not None:
        otel_env(OTEL_TRACES_EXPORTER=value)
    providers = providers_from_env("test")
    assert (providers.tracer_provider is not None) == traces
    assert providers.meter_provider is None and providers.logger_provider is None
    providers.shutdown()


def test_an_unknown_exporter_is_an_error(otel_env):
    otel_env(OTEL_TRACES_EXPORTER="zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin'") as info:
        providers_from_env("test")
    assert "installed exporters" in str(info.value) and "otlp_proto_http" in str(info.value)


@pytest.mark.parametrize(("variables", "expected"), [
    ({}, GrpcSpanExporter),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, GrpcSpanExporter),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, HttpSpanExporter),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"},
     HttpSpanExporter),
], ids=["default", "grpc", "http", "per-signal"])
def test_the_otlp_protocol_is_the_sdk_s_choice(otel_env, variables, expected):
    otel_env(OTEL_TRACES_EXPORTER="otlp", **variables)
    providers = providers_from_env("test")
    assert span_exporters(providers.tracer_provider) == [expected]
    providers.shutdown()


def test_every_exporter_named_is_used_and_a_wrong_protocol_is_an_error(otel_env):
    otel_env(OTEL_TRACES_EXPORTER="console,otlp_proto_http, otlp_proto_grpc")
    providers = providers_from_env("test")
    assert span_exporters(providers.tracer_provider) == [
        ConsoleSpanExporter, HttpSpanExporter, GrpcSpanExporter]
    providers.shutdown()
    otel_env(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/json")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER.*http/json"):
        providers_from_env("test")


def test_metrics_and_logs_exporters_include_prometheus(otel_env):
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    otel_env(OTEL_METRICS_EXPORTER="prometheus,otlp", OTEL_LOGS_EXPORTER="console",
             OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="http/protobuf",
             OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
             OTEL_EXPORTER_PROMETHEUS_PORT=str(free_port()))
    providers = providers_from_env("test", prometheus=True)
    readers = metric_readers(providers.meter_provider)
    assert len(readers) == 2  # the endpoint's reader is the one the variable asked for
    assert isinstance(readers[0], PrometheusMetricReader)
    assert isinstance(readers[1], PeriodicExportingMetricReader)
    exporter_module = type(readers[1]._exporter).__module__
    assert exporter_module.startswith("opentelemetry.exporter.otlp.proto.http")
    assert providers.tracer_provider is None and providers.logger_provider is not None
    providers.shutdown()


def test_sampler_resource_and_sdk_disabled_follow_the_sdk(otel_env):
    otel_env(OTEL_TRACES_EXPORTER="console", OTEL_TRACES_SAMPLER="always_off")
    providers = providers_from_env("default-name")
    provider = providers.tracer_provider
    assert not provider.get_tracer("t").start_span("x").is_recording()
    assert provider.resource.attributes["service.name"] == "default-name"
    providers.shutdown()
    for variables in ({"OTEL_SERVICE_NAME": "from-variable"},
                      {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-variable,team=search"}):
        otel_env(**variables)
        providers = providers_from_env("default-name")
        assert providers.tracer_provider.resource.attributes["service.name"] == "from-variable"
        providers.shutdown()
    otel_env(OTEL_SDK_DISABLED="true", OTEL_METRICS_EXPORTER="console")
    assert providers_from_env("test", prometheus=True) == Providers(None, None, None)


def metric_points(reader: InMemoryMetricReader) -> dict[str, list]:
    points: dict[str, list] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def counter_values(points, name: str, key: str) -> dict[str, int]:
    return {p.attributes.get(key): p.value for p in points.get(name, [])}


def test_server_metrics_have_second_scale_buckets_counts_and_in_flight(
    datastore, datastore_dir, documents
):
    reader = InMemoryMetricReader()
    config = ServerConfig(datastore=str(datastore_dir), port=0, max_concurrent_searches=2,
                          workers=2)
    gated = GatedDatastore(datastore)
    gated.gate.set()
    with BackgroundServer(config, gated, meter_provider=MeterProvider(metric_readers=[reader])) \
            as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        contexts = random_contexts(documents, 20, seed=2)
        for context in contexts:
            stub.Search(wire.search_request(context, SearchParams()))
        for bad in (pb.SearchRequest(), pb.SearchRequest(context=[1], shard="nope")):
            with pytest.raises(grpc.RpcError):
                stub.Search(bad)
        gated.gate.clear()
        held = [stub.Search.future(wire.search_request([1, 2], SearchParams()), timeout=30)
                for _ in range(2)]
        gated.wait_entered(22)  # the 20 searches above, then the two held at the gate
        points = metric_points(reader)
        (in_flight,) = points["rest.retriever.server.searches.in_flight"]
        assert in_flight.value == 2
        with pytest.raises(grpc.RpcError) as refused:
            stub.Search(wire.search_request([1, 2], SearchParams()), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gated.gate.set()
        for future in held:
            future.result()
        points = metric_points(reader)

    assert counter_values(points, "rest.retriever.server.requests", "rpc.method") == {
        "Search": len(contexts) + 2 + 2 + 1}
    assert counter_values(points, "rest.retriever.server.errors", "error") == {
        "INVALID_ARGUMENT": 1, "NOT_FOUND": 1, "RESOURCE_EXHAUSTED": 1}
    assert counter_values(points, "rest.retriever.server.rejections", "reason") == {
        "overloaded": 1}
    latency = {p.attributes["outcome"]: p for p in
               points["rest.retriever.server.search.duration"]}
    ok = latency["ok"]
    assert tuple(ok.explicit_bounds) == LATENCY_BUCKETS_S
    assert ok.explicit_bounds[0] == 1e-5 and ok.explicit_bounds[-1] == 10.0
    assert ok.count == len(contexts) + 2
    # Seconds-scale buckets: the searches spread over buckets, not all below the first bound.
    assert ok.bucket_counts[0] < ok.count


def test_unauthenticated_calls_are_counted_as_rejections(datastore, datastore_dir):
    reader = InMemoryMetricReader()
    config = ServerConfig(datastore=str(datastore_dir), port=0, token="s3cret")
    meter_provider = MeterProvider(metric_readers=[reader])
    with BackgroundServer(config, datastore, meter_provider=meter_provider) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError):
            pb_grpc.RetrieverStub(channel).Info(pb.InfoRequest(), timeout=10)
    rejections = counter_values(metric_points(reader), "rest.retriever.server.rejections",
                                "reason")
    assert rejections == {"unauthenticated": 1}


def scrape(url: str) -> dict[str, list]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_metrics_port_serves_prometheus_text(server_process, datastore_dir, otel_env):
    server = server_process("--datastore", str(datastore_dir), "--metrics-port", "0")
    line = server.proc.stdout.readline()
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
    assert match, line
    with RemoteRetriever(server.address, deadline_s=5) as retriever, \
            retriever.session() as session:
        for context in ([1, 2, 3], [4, 5], [6]):
            assert session.search(context, SearchParams()) is not None
        assert session.search([1, 10_000], SearchParams()) is None  # out of the vocabulary
    families = scrape(match.group(1))
    requests = families["rest_retriever_server_requests"]
    assert [s.value for s in requests if s.name.endswith("_total")] == [4]
    errors = {s.labels["error"]: s.value for s in families["rest_retriever_server_errors"]
              if s.name.endswith("_total")}
    assert errors == {"INVALID_ARGUMENT": 1}
    buckets = [s for s in families["rest_retriever_server_search_duration_seconds"]
               if s.name.endswith("_bucket") and s.labels["outcome"] == "ok"]
    assert [float(s.labels["le"]) for s in buckets] == [*LATENCY_BUCKETS_S, float("inf")]
    assert buckets[-1].value == 3
    (in_flight,) = families["rest_retriever_server_searches_in_flight"]
    assert in_flight.value == 0
    server.terminate()
    assert server.wait() == 0


def test_a_metrics_port_in_use_is_one_line(datastore_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore_dir),
             "--port", "0", "--metrics-port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"retriever-server: error: could not serve metrics on 127.0.0.1:{port}: --metrics-port"
        f" {port} is in use (another retriever-server?); choose another port, 0 for a free one,"
        " or stop the process that holds it"]


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
