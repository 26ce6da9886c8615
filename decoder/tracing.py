"""One generation, one trace: the generation's span, current while it drafts.

A generation's searches are made by its draft sources deep inside a decoding step; their spans
(``retriever_service.telemetry``) take the current span as their parent, and the server's spans
for them continue those (the request carries the client span's trace context). So the decoder's
part is small: start one span per generation (``GenerationTrace``), make it current around each
drafting step (``drafting``), end it with the generation's figures (``end``).

Spans go to the global tracer provider: nothing is recorded unless the application installed an
SDK, as ``rest generate`` does from the ``OTEL_*`` variables (``otel_from_env``). An unrecorded
generation costs one no-op span and nothing per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

INSTRUMENTATION_NAME = "decoder"
SPAN_NAME = "rest.generate"


class GenerationTrace:
    """The span of one generation (one sequence, from its prefill to its last token)."""

    __slots__ = ("span", "_context")

    def __init__(self, prompt_tokens: int, request_id: str | None = None,
                 tracer_provider=None) -> None:
        tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        attributes: dict[str, Any] = {"rest.prompt_tokens": prompt_tokens}
        if request_id is not None:
            attributes["rest.request_id"] = request_id
        self.span = tracer.start_span(SPAN_NAME, kind=trace.SpanKind.INTERNAL,
                                      attributes=attributes)
        recording = self.span.is_recording()
        self._context = trace.set_span_in_context(self.span) if recording else None

    @contextmanager
    def drafting(self) -> Iterator[None]:
        """Make the generation's span current for the block (a drafting step), so that the
        searches made in it are its children. Attached and detached per step: a generator
        that yields between steps may be resumed from another context."""
        if self._context is None:
            yield
            return
        token = otel_context.attach(self._context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def end(self, finish_reason: str | None = None, stats: Any = None) -> None:
        """End the span, with the generation's figures (a ``GenerationStats``) when it has them."""
        span = self.span
        if span.is_recording():
            if finish_reason is not None:
                span.set_attribute("rest.finish_reason", finish_reason)
            if stats is not None:
                for name in ("new_tokens", "steps", "draft_tokens", "accepted_draft_tokens",
                             "retrieval_failures"):
                    span.set_attribute(f"rest.{name}", getattr(stats, name))
                span.set_attribute("rest.retrieval_ms", stats.retrieval_s * 1e3)
                span.set_attribute("rest.verification_ms", stats.verification_s * 1e3)
        span.end()


def otel_from_env(service_name: str) -> Callable[[Callable], Callable]:
    """Decorator for a command: install the OpenTelemetry SDK as the ``OTEL_*`` variables say
    (``retriever_service.telemetry.install_from_env``) for the command's run, and flush what it
    recorded when the command ends. A variable the SDK cannot satisfy is a one-line error."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            import click

            from retriever_service.telemetry import install_from_env

            try:
                providers = install_from_env(service_name)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from exc
            try:
                return command(*args, **kwargs)
            finally:
                providers.shutdown()

        return wrapper

    return decorate
