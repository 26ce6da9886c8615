"""``BatchDecoder``'s interface over ``RestGenerator``'s own steps, one sequence at a time.

A stand-in until the batched core (``decoder.batch``) is installed: ``step`` advances every
running sequence by one step of its own (one forward pass each, not one for the whole batch), so
that the server above it works, and each sequence's output is exactly ``RestGenerator``'s.
Requests join and leave between steps, as with the batched core.

Its per-step statistics are coarser: a sequence's draft tokens and drafting and verification
times are counted in the step where it finishes (``RestGenerator`` reports them per call);
emitted and accepted tokens are counted in the step that produced them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from decoder.generator import GenerationStats, GenerationStream, RestGenerator, StreamChunk
from decoder.model_support import check_length
from decoder.sampling import SamplingParams
from decoder.stopping import StopChecker


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to decode. ``generation``: ``GenerationConfig`` keyword arguments (missing
    ones: the model's own); ``stop``: strings and/or token-id sequences that end the output;
    ``drafting``: False decodes with plain steps."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    generation: dict = field(default_factory=dict)
    stop: tuple = ()
    drafting: bool = True


@dataclass(frozen=True)
class SequenceUpdate:
    """What one step did for one sequence: the tokens it emitted, and once the sequence is done
    why it ended (``"eos" | "stop" | "length" | "abort"``) and its statistics."""

    request_id: str
    tokens: list[int]
    finish_reason: str | None
    stats: GenerationStats | None


@dataclass(frozen=True)
class StepStats:
    """One step over the whole batch."""

    batch_size: int
    draft_tokens: int
    accepted_draft_tokens: int
    emitted_tokens: int
    retrieval_s: float
    retrieval_failures: int
    verification_s: float


@dataclass
class _Running:
    request: SequenceRequest
    stream: GenerationStream
    chunks: Iterator[StreamChunk]


def sampling_keywords(generation: dict) -> dict[str, Any]:
    """``RestGenerator``'s sampling keywords for ``GenerationConfig``-style settings: sampling
    only when ``do_sample`` is set (as in ``GenerationConfig``)."""
    if not generation.get("do_sample"):
        return {"temperature": 0.0}
    return {
        "temperature": float(generation.get("temperature", 1.0)),
        "top_p": float(generation.get("top_p", 1.0)),
        "top_k": int(generation.get("top_k") or 0),
        "seed": generation.get("seed"),
    }


class SequentialDecoder:
    """``BatchDecoder``'s interface (``validate``, ``add``, ``abort``, ``step``) over a
    ``RestGenerator``; at most ``max_batch`` sequences run, the others wait in arrival order."""

    def __init__(self, generator: RestGenerator, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.generator = generator
        self.max_batch = max_batch
        self._waiting: deque[SequenceRequest] = deque()
        self._running: dict[str, _Running] = {}
        self._aborted: set[str] = set()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._aborted)

    def validate(self, request: SequenceRequest) -> None:
        """Raise ``ValueError`` (or a ``DecoderError``) with a message for the user."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: generation needs at least one token to follow")
        vocab = self.generator.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        keywords = sampling_keywords(request.generation)
        SamplingParams(keywords["temperature"], keywords.get("top_p", 1.0),
                       keywords.get("top_k", 0))  # fmt: skip
        StopChecker(request.max_new_tokens, (), request.stop, self.generator.tokenizer)
        check_length(self.generator.model.config, len(request.prompt_ids), request.max_new_tokens)

    def add(self, request: SequenceRequest) -> None:
        self._waiting.append(request)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    def step(self) -> tuple[list[SequenceUpdate], StepStats]:
        updates = self._leave_aborted()
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting.popleft()
            stream = self.generator.stream(
                request.prompt_ids, request.max_new_tokens, stop=list(request.stop),
                plain=not request.drafting, **sampling_keywords(request.generation),
            )  # fmt: skip
            self._running[request.request_id] = _Running(request, stream, iter(stream))
        batch_size = emitted = accepted = draft_tokens = failures = 0
        retrieval_s = verification_s = 0.0
        for request_id, running in list(self._running.items()):
            tokens = self._next_tokens(running)
            if tokens is not None:
                batch_size += 1
                emitted += len(tokens)
                accepted += max(len(tokens) - 1, 0)
                updates.append(SequenceUpdate(request_id, tokens, None, None))
                continue
            del self._running[request_id]
            result = running.stream.result
            assert result is not None
            stats = result.stats
            draft_tokens += stats.draft_tokens
            failures += stats.retrieval_failures
            retrieval_s += stats.retrieval_s
            verification_s += stats.verification_s
            updates.append(SequenceUpdate(request_id, [], result.finish_reason, stats))
        stats = StepStats(batch_size, draft_tokens, accepted, emitted, retrieval_s, failures,
                          verification_s)  # fmt: skip
        return updates, stats

    @staticmethod
    def _next_tokens(running: _Running) -> list[int] | None:
        """The next step's tokens, or None once the sequence has ended."""
        for chunk in running.chunks:
            if chunk.tokens:
                return chunk.tokens
            # A chunk without tokens only carries held-back text, after the last step.
        return None

    def _leave_aborted(self) -> list[SequenceUpdate]:
        updates = []
        for request_id in self._aborted:
            running = self._running.pop(request_id, None)
            if running is not None:
                running.chunks.close()  # type: ignore[attr-defined]  # releases the draft sources
            self._waiting = deque(r for r in self._waiting if r.request_id != request_id)
            updates.append(SequenceUpdate(request_id, [], "abort", None))
        self._aborted.clear()
        return updates
