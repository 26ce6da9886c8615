"""decoder/tracing.py: one generation is one trace, from the decoder's span through its searches to
the server's spans for them, across a real retriever-server process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from decoder import DecodingConfig, RestGenerator
from decoder.tracing import SPAN_NAME, GenerationTrace
from rest.datastore import build_datastore
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from retriever_service.client import RemoteRetriever
from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer, prompts
from tests.retriever_service.service_testing import (
    ROOT,
    OtlpCollector,
    ServerProcess,
    wait_until,
)

SEARCH = "rest.retriever.search"
STREAM = "/rest.retriever.v1.Retriever/SearchStream"


@pytest.fixture
def global_spans(monkeypatch) -> InMemorySpanExporter:
    """An SDK as the application's global tracer provider for this test, spans kept in memory.
    (OpenTelemetry lets a process set its global provider once; the test swaps it back.)"""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    return exporter


def own_datastore(path, prompt, continuation):
    """A datastore that holds the model's own continuation: drafts are found and accepted."""
    tokenizer = make_tokenizer()
    build_datastore(path, [prompt + continuation] * 3, vocab_size=VOCAB,
                    tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))


def test_the_generation_span_is_current_only_while_drafting(global_spans):
    generation = GenerationTrace(prompt_tokens=5, request_id="r1")
    tracer = trace.get_tracer("test")
    with generation.drafting():
        tracer.start_span("inside").end()
    tracer.start_span("outside").end()

    class Stats:
        new_tokens, steps, draft_tokens, accepted_draft_tokens, retrieval_failures = 9, 4, 12, 5, 1
        retrieval_s, verification_s = 0.002, 0.01

    generation.end("length", Stats())
    spans = {s.name: s for s in global_spans.get_finished_spans()}
    parent = spans[SPAN_NAME]
    assert spans["inside"].parent.span_id == parent.context.span_id
    assert spans["outside"].parent is None
    assert parent.attributes["rest.prompt_tokens"] == 5
    assert parent.attributes["rest.request_id"] == "r1"
    assert parent.attributes["rest.finish_reason"] == "length"
    assert parent.attributes["rest.accepted_draft_tokens"] == 5


def test_an_untraced_generation_attaches_nothing():
    generation = GenerationTrace(prompt_tokens=3)  # the global provider is the API's no-op
    assert not generation.span.is_recording()
    before = trace.get_current_span()
    with generation.drafting():
        assert trace.get_current_span() is before
    generation.end()


def test_one_generation_is_one_trace_across_a_server_process(tmp_path, global_spans):
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts(1, seed=3)[0]
    expected = hf_greedy(model, prompt, 24)
    own_datastore(tmp_path / "ds", prompt, expected)
    with OtlpCollector() as collector:
        server = ServerProcess("--datastore", str(tmp_path / "ds"),
                               env=collector.exporter_env("grpc"))
        try:
            with RemoteRetriever(server.address, deadline_s=5) as retriever:
                generator = RestGenerator(model, tokenizer, retriever,
                                          DecodingConfig(budget=16, context_drafts=False))
                result = generator.generate(prompt, 24)
        finally:
            server.terminate()  # SIGTERM: the server flushes its spans before it exits
            assert server.wait() == 0
        assert wait_until(lambda: any(s.name == STREAM for s in collector.spans))
        server_spans = list(collector.spans)
    assert result.tokens == expected
    assert result.stats.steps < len(expected)  # drafts came from the server and were accepted

    client_spans = global_spans.get_finished_spans()
    (generation,) = [s for s in client_spans if s.name == SPAN_NAME]
    trace_id = generation.context.trace_id
    client_searches = [s for s in client_spans if s.name == SEARCH]
    # Every drafting step searched: all but the prefill's and a last step with one token left
    # (nothing to draft for).
    assert len(client_searches) >= result.stats.steps - 2
    for span in client_searches:
        assert span.context.trace_id == trace_id
        assert span.parent.span_id == generation.context.span_id
    (client_stream,) = [s for s in client_spans if s.name == STREAM]
    assert client_stream.parent.span_id == generation.context.span_id

    hex_trace = f"{trace_id:032x}"
    client_search_ids = {f"{s.context.span_id:016x}" for s in client_searches}
    server_searches = [s for s in server_spans if s.name == SEARCH]
    assert len(server_searches) == len(client_searches)
    for span in server_searches:
        assert span.service == "rest-retriever"
        assert span.trace_id == hex_trace
        assert span.parent_id in client_search_ids  # the search that asked for it
    assert {s.parent_id for s in server_searches} == client_search_ids
    (server_stream,) = [s for s in server_spans if s.name == STREAM]
    assert server_stream.trace_id == hex_trace
    assert server_stream.parent_id == f"{client_stream.context.span_id:016x}"
    # Everything the generation did is in its trace: one trace, not one per search.
    generation_work = [s for s in client_spans if s.name in (SEARCH, STREAM, SPAN_NAME)]
    assert {s.context.trace_id for s in generation_work} == {trace_id}
    assert {s.trace_id for s in server_spans if s.name in (SEARCH, STREAM)} == {hex_trace}


def test_rest_generate_exports_one_trace_per_generation_as_otel_variables_say(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompt_ids = [5, 7, 9, 11]
    expected = hf_greedy(model, prompt_ids, 12)
    own_datastore(tmp_path / "ds", prompt_ids, expected)
    with OtlpCollector() as collector:
        # The server exports over OTLP/gRPC, the command over OTLP/HTTP: both protocols.
        server = ServerProcess("--datastore", str(tmp_path / "ds"),
                               env=collector.exporter_env("grpc"))
        try:
            environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
            done = subprocess.run(
                [sys.executable, "-m", "rest.cli", "generate", "--model", str(model_dir),
                 "--retriever", server.address, "--prompt", "w5 w7 w9 w11",
                 "--max-new-tokens", "12", "--budget", "8", "--no-context-drafts", "--json"],
                cwd=ROOT, capture_output=True, text=True, timeout=300,
                env={**environ, "PYTHONPATH": str(ROOT), **collector.exporter_env("http/protobuf"),
                     "OTEL_SERVICE_NAME": "rest-generate-test"})
        finally:
            server.terminate()
            assert server.wait() == 0
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["tokens"] == expected
        assert wait_until(lambda: any(s.name == STREAM and s.service == "rest-retriever"
                                      for s in collector.spans))
        spans = list(collector.spans)

    (generation,) = [s for s in spans if s.name == SPAN_NAME]
    assert generation.service == "rest-generate-test"  # OTEL_SERVICE_NAME is honoured
    in_trace = [s for s in spans if s.trace_id == generation.trace_id]
    client_searches = {s.span_id for s in in_trace
                       if s.name == SEARCH and s.service == "rest-generate-test"}
    server_searches = [s for s in in_trace if s.name == SEARCH and s.service == "rest-retriever"]
    assert client_searches and len(server_searches) == len(client_searches)
    assert {s.parent_id for s in server_searches} == client_searches
    searches_anywhere = [s for s in spans if s.name in (SEARCH, STREAM)]
    assert {s.trace_id for s in searches_anywhere} == {generation.trace_id}
