"""Prometheus metrics of one server, declared once (name, unit, help) in its own registry.

Names follow vLLM's where users know them (``vllm:spec_decode_num_draft_tokens`` and
``vllm:spec_decode_num_accepted_tokens`` become ``rest_decoder_spec_decode_num_draft_tokens_total``
and ``rest_decoder_spec_decode_num_accepted_tokens_total``), in base units (seconds, tokens).
Labels are few and bounded (a finish reason, a rejection reason); never a request id.

Mean accepted tokens per step (M) over any interval is
``generation_tokens_total / sequence_steps_total`` (each step of each sequence emits its
accepted draft tokens plus one), the acceptance rate ``accepted / draft tokens``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

PREFIX = "rest_decoder"
# Per-step times run from tens of microseconds (retrieval in-process) to seconds (a large batch
# on a slow device); per-request times up to minutes.
STEP_SECONDS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0)  # fmt: skip
REQUEST_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)  # fmt: skip
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FINISH_REASONS = ("stop", "length", "abort", "error")
REJECTION_REASONS = ("invalid", "overloaded", "unavailable")


class ServerMetrics:
    """Every metric of the server. The engine thread records steps, the event loop requests;
    prometheus_client's metrics are thread-safe."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        def counter(name, documentation, unit="", labels=()):
            return Counter(f"{PREFIX}_{name}", documentation, labels, unit=unit, registry=r)

        def histogram(name, documentation, buckets, unit=""):
            return Histogram(f"{PREFIX}_{name}", documentation, unit=unit, buckets=buckets,
                             registry=r)  # fmt: skip

        self.requests = counter(
            "requests", "Requests finished, by OpenAI finish reason (stop, length, abort: the "
            "client went away, error).", labels=("finish_reason",))  # fmt: skip
        self.rejected = counter(
            "requests_rejected", "Requests refused before any work: invalid (4xx), overloaded "
            "(429), unavailable (503: loading, draining or failed).", labels=("reason",))  # fmt: skip
        self.running = Gauge(f"{PREFIX}_requests_running", "Sequences in the decoding batch.",
                             registry=r)  # fmt: skip
        self.waiting = Gauge(f"{PREFIX}_requests_waiting",
                             "Admitted sequences waiting for a place in the batch.", registry=r)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.",
                                     unit="tokens")  # fmt: skip
        self.generation_tokens = counter("generation_tokens", "Tokens generated.", unit="tokens")
        self.steps = counter("steps", "Decoding steps (one verification pass over the batch).")
        self.sequence_steps = counter(
            "sequence_steps", "Steps summed over the sequences in each step's batch (plain "
            "decoding emits one token per sequence step).")  # fmt: skip
        self.draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tokens verified (vLLM: "
            "spec_decode_num_draft_tokens).", unit="tokens")  # fmt: skip
        self.accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens accepted (vLLM: "
            "spec_decode_num_accepted_tokens).", unit="tokens")  # fmt: skip
        self.retrieval_failures = counter(
            "retrieval_failures", "Retrievals that failed or missed their deadline (those steps "
            "draft from the other sources; output is unchanged).")  # fmt: skip
        self.retrieval_seconds = histogram(
            "step_retrieval", "Drafting time of one step (every source and the scoring).",
            STEP_SECONDS, unit="seconds")  # fmt: skip
        self.verification_seconds = histogram(
            "step_verification", "Verification time of one step (the forward pass over every "
            "sequence's tree, and acceptance).", STEP_SECONDS, unit="seconds")  # fmt: skip
        self.batch_size = histogram("batch_size", "Sequences in the batch of one step.",
                                    BATCH_SIZES)  # fmt: skip
        self.time_to_first_token = histogram(
            "time_to_first_token", "From admission to the first generated token.",
            REQUEST_SECONDS, unit="seconds")  # fmt: skip
        self.request_latency = histogram(
            "e2e_request_latency", "From admission to the last token.", REQUEST_SECONDS,
            unit="seconds")  # fmt: skip
        for reason in FINISH_REASONS:
            self.requests.labels(reason)  # present at zero from the start
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)

    def observe_step(self, stats, num_running: int, num_waiting: int) -> None:
        """One ``StepStats`` and the decoder's queue lengths after the step. A step in which no
        sequence ran (one that only let sequences join or leave) adds its counts but is not a
        decoding step."""
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        self.generation_tokens.inc(stats.emitted_tokens)
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted_tokens.inc(stats.accepted_draft_tokens)
        self.retrieval_failures.inc(stats.retrieval_failures)
        if stats.batch_size == 0:
            return
        self.steps.inc()
        self.sequence_steps.inc(stats.batch_size)
        self.batch_size.observe(stats.batch_size)
        self.retrieval_seconds.observe(stats.retrieval_s)
        self.verification_seconds.observe(stats.verification_s)

    def exposition(self, accept_header: str | None) -> tuple[bytes, str]:
        """The metrics as the scraper asked for them (Prometheus text, or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.registry), content_type
