"""Lossless retrieval-based speculative decoding for a Hugging Face causal LM.

``RestGenerator`` holds what every generation shares: the model (checked once, ``ModelProfile``),
the tokenizer, the retriever, the draft sources, the served outputs, the verification costs and
the score correction. ``generate`` and ``stream`` run one request through ``BatchDecoder`` with a
batch of one, the same step the batched server runs (``decoder/batch.py``): prefill as ``generate``
does, then per step the draft sources propose levels of counted continuations of the context, one
scorer turns them into a draft tree, cut to what positions allow and to the budget; the root and
the draft nodes go through the model in one forward pass with tree attention; the tree walk
accepts the path the model itself would have produced and adds the bonus token; the KV cache
keeps only the accepted path; stop conditions are checked token by token. When the call ends,
its output joins the served outputs that later calls draft from. Terms are defined in the package
docstring (``decoder/__init__.py``).

Exactness: in float32 the output is ``model.generate``'s with the model's own generation config
(greedy: token for token; sampled: the same distribution). In bfloat16 and float16 a plain step
(no draft nodes) computes exactly what ``generate`` computes, but a tree step feeds several tokens
at once, so its rounding differs, and a near-tie between two tokens can flip: outputs are usually,
not always, identical (``bench/decoder_precision.py`` measures how often).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from decoder.batch import BatchDecoder, SequenceRequest
from decoder.budget import (
    BatchCostModel,
    CostCorrection,
    CostModel,
    DraftingGate,
    ScoreCorrection,
)
from decoder.config import DecodingConfig
from decoder.draft_sources import DraftSource, open_draft_sources, served_outputs
from decoder.errors import TokenizerMismatchError
from decoder.model_support import check_model
from decoder.ngram_index import ServedOutputs
from decoder.settings import DEFAULT_MAX_NEW_TOKENS
from decoder.stats import GenerationStats
from rest.retriever import Retriever, RetrieverUnavailable
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from rest.types import DatastoreInfo

log = logging.getLogger(__name__)

# How often a generator asks a retriever that did not answer whether it answers now.
RETRIEVER_RETRY_S = 1.0

@dataclass(frozen=True)
class GenerationResult:
    """The new tokens (prompt excluded), their text (special tokens skipped), why generation
    ended (``"eos"``, ``"stop"`` or ``"length"``) and the call's statistics."""

    tokens: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats


@dataclass(frozen=True)
class StreamChunk:
    """The tokens one step emitted and the text they complete (possibly empty: a character split
    over several tokens waits for its last byte)."""

    tokens: list[int]
    text: str


class GenerationStream:
    """Iterate for ``StreamChunk``s; ``result`` holds the ``GenerationResult`` once exhausted."""

    def __init__(self, steps: Generator[list[int], None, GenerationResult], tokenizer: Any) -> None:
        self._steps = steps
        self._tokenizer = tokenizer
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[StreamChunk]:
        detokenizer = IncrementalDetokenizer(self._tokenizer)
        try:
            while True:
                try:
                    tokens = next(self._steps)
                except StopIteration as done:
                    self.result = done.value
                    break
                yield StreamChunk(tokens, detokenizer.add(tokens))
        finally:
            self._steps.close()  # a consumer that stops early still releases the draft sources
        rest = detokenizer.flush()
        if rest:
            yield StreamChunk([], rest)


class IncrementalDetokenizer:
    """Text for tokens arriving in pieces, without decoding the whole output every step.

    It decodes from a recent offset and keeps the part after the previously decoded text, so that
    tokenizers whose first token decodes differently at the start of a string (SentencePiece's
    leading space) stay right; text ending in an incomplete character is held back.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def add(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever was held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full_text[len(prefix_text) :]


class RestGenerator:
    """Generates with draft trees from a retriever, the context itself and the outputs it served
    before, verified by the model so that the output is the model's own.

    ``retriever``: a ``rest.retriever.Retriever`` (local or remote) or None. Its tokenizer
    fingerprint must match ``tokenizer``'s unless ``config.allow_tokenizer_mismatch``. A
    retriever that does not answer yet (``RetrieverUnavailable``) costs one warning: generations
    decode without it and use it once it answers, its tokenizer checked then, unless
    ``config.require_retriever``. ``draft_sources``: more proposers, shared by every call (they
    must not keep per-call state, and may be asked from several threads at once: a batch drafts
    its sequences together). ``served``: the outputs of earlier calls (prompts excluded),
    added as each call ends. ``score_correction``: how far recent steps bore out the draft
    scores; ``cost_correction``: what recent steps cost beyond the calibrated verification cost;
    ``drafting_gate``: the batch sizes at which drafting stopped paying (the adaptive budget uses
    all three). The model must pass
    ``decoder.model_support.check_model``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        retriever: Retriever | None = None,
        config: DecodingConfig = DecodingConfig(),
        draft_sources: Sequence[DraftSource] = (),
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config = config.resolved()
        self.draft_sources = tuple(draft_sources)
        self.served: ServedOutputs | None = served_outputs(config)
        self.score_correction: ScoreCorrection | None = None
        if config.score_correction:
            self.score_correction = ScoreCorrection(config.score_correction_decay)
        # Whether steps of each batch size draft at all (the adaptive budget only).
        self.drafting_gate: DraftingGate | None = None
        if config.adaptive and config.drafting_gate:
            self.drafting_gate = DraftingGate()
        # How far real steps cost what the calibration predicts (the adaptive budget only).
        self.cost_correction: CostCorrection | None = None
        if config.adaptive and config.cost_correction:
            self.cost_correction = CostCorrection()
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.profile = check_model(model)
        self.costs = BatchCostModel(model, self.profile, config.max_budget,
                                    config.calibration_prefix, config.calibration_repeats)  # fmt: skip
        self._retriever_ready = False
        self._retriever_asked = float("-inf")
        self._ids = itertools.count()
        if retriever is not None:
            self.check_retriever(first=True)

    # --- shared resources, used by BatchDecoder -------------------------------------------------

    def verification_cost(self, batch_size: int = 1) -> CostModel:
        """Verification cost per tree size for ``batch_size`` rows (measured on first use)."""
        return self.costs.for_batch(batch_size)

    @property
    def cost_model(self) -> CostModel | None:
        """The verification cost of a batch of one, once measured (or set)."""
        return self.costs.by_batch_size.get(1)

    @cost_model.setter
    def cost_model(self, cost: CostModel) -> None:
        self.costs.by_batch_size[1] = cost

    def calibrate(self) -> CostModel:
        """Measure the verification cost of a batch of one now rather than on first use."""
        return self.verification_cost(1)

    def check_retriever(self, first: bool = False) -> bool:
        """Whether the retriever can be used: it answered ``info()`` and its tokenizer matches.

        Raises ``TokenizerMismatchError`` for a datastore of another tokenizer (unless allowed),
        and ``RetrieverUnavailable`` on the first check if ``config.require_retriever``.
        """
        if self.retriever is None or self._retriever_ready:
            return self._retriever_ready
        now = time.monotonic()
        if not first and now - self._retriever_asked < RETRIEVER_RETRY_S:
            return False
        self._retriever_asked = now
        try:
            info = self.retriever.info()
        except RetrieverUnavailable as exc:
            if self.config.require_retriever:
                raise
            if first:
                log.warning("the retriever does not answer (%s); decoding without its drafts "
                            "until it does", exc)  # fmt: skip
            return False
        check_tokenizer(self.tokenizer, info, self.config.allow_tokenizer_mismatch)
        if not first:
            log.info("the retriever answers again; its drafts are used from now on")
        self._retriever_ready = True
        return True

    def open_sources(self) -> list[DraftSource]:
        """The draft sources of one generation (close them when it ends)."""
        retriever = self.retriever if self.check_retriever() else None
        return open_draft_sources(self.config, retriever, self.served, self.draft_sources)

    def served_output(self, tokens: Sequence[int]) -> None:
        """A generation that drafted has ended: later ones may draft from its output. Plain
        calls leave no trace: a baseline run must not feed the drafted run it is compared with."""
        if self.served is not None:
            self.served.add(list(tokens))

    # --- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        generation_config: GenerationConfig | int | None = None,
        *,
        stop: Sequence[str | Sequence[int]] = (),
        plain: bool = False,
        **kwargs: Any,
    ) -> GenerationResult:
        """Generate after ``prompt`` (text or token ids) as ``model.generate`` would.

        ``generation_config``: a ``GenerationConfig`` (default: the model's own); an int is read
        as ``max_new_tokens``, as the older positional form. ``kwargs``: ``GenerationConfig``
        attributes overriding it (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``top_k``, ``min_p``, ``typical_p``, ``repetition_penalty``, ...) and ``seed`` (an int,
        or a CPU ``torch.Generator`` that the draws advance). ``temperature=0`` is greedy and a
        temperature above 0 samples unless ``do_sample`` is given. ``stop``: strings and/or
        token-id sequences that end the output (kept in it). ``plain``: no drafts at all, the
        autoregressive baseline running the same code.
        """
        steps = self._start(prompt, generation_config, stop, plain, kwargs)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompt: str | Sequence[int],
        generation_config: GenerationConfig | int | None = None,
        *,
        stop: Sequence[str | Sequence[int]] = (),
        plain: bool = False,
        **kwargs: Any,
    ) -> GenerationStream:
        """Like ``generate``, as an iterator of ``StreamChunk``s (one per step)."""
        steps = self._start(prompt, generation_config, stop, plain, kwargs)
        return GenerationStream(steps, self.tokenizer)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token to follow")
        return [int(i) for i in ids]

    def _start(
        self,
        prompt: str | Sequence[int],
        generation_config: GenerationConfig | int | None,
        stop: Sequence[str | Sequence[int]],
        plain: bool,
        options: dict[str, Any],
    ) -> Generator[list[int], None, GenerationResult]:
        """Check the request and queue it (its steps run as they are iterated)."""
        options = dict(options)
        if isinstance(generation_config, int) and not isinstance(generation_config, bool):
            options.setdefault("max_new_tokens", generation_config)
            generation_config = None
        ids = self.encode(prompt)
        request = SequenceRequest(
            request_id=f"generate-{next(self._ids)}",
            prompt_ids=ids,
            max_new_tokens=self._max_new_tokens(ids, generation_config, options),
            generation=options,
            stop=tuple(stop),
            drafting=not plain,
        )
        decoder = BatchDecoder(self, max_batch=1)
        decoder.add(request, generation_config)
        if not plain and self.config.adaptive and self.config.tree_budget > 0:
            self.verification_cost(1)  # measured before the first step, not in its timings
        return self._steps(decoder)

    def _max_new_tokens(
        self, ids: list[int], generation_config: GenerationConfig | None, options: dict[str, Any]
    ) -> int:
        """The call's, else the base generation config's, else ``max_length`` given in the call
        minus the prompt, else 128."""
        value = options.pop("max_new_tokens", None)
        for source in (generation_config, self.model.generation_config):
            if value is None and source is not None:
                value = source.max_new_tokens
        if value is None and options.get("max_length") is not None:
            value = int(options["max_length"]) - len(ids)
            if value < 1:
                raise ValueError(
                    f"max_length ({options['max_length']}) leaves no room after the prompt "
                    f"({len(ids)} tokens); raise it or set max_new_tokens"
                )
        options.pop("max_length", None)
        return int(value) if value is not None else DEFAULT_MAX_NEW_TOKENS

    def _steps(self, decoder: BatchDecoder) -> Generator[list[int], None, GenerationResult]:
        """Yield each step's new tokens; return the result. One generation: a tracing wrapper
        around it sees exactly one request from start to end."""
        tokens: list[int] = []
        try:
            while True:
                updates, _ = decoder.step()
                for update in updates:
                    tokens.extend(update.tokens)
                    if update.finish_reason is not None:
                        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                        if update.tokens:
                            yield update.tokens
                        return GenerationResult(tokens, text, update.finish_reason, update.stats)
                    yield update.tokens
        finally:
            decoder.close()  # a consumer that stops early still releases the draft sources


def check_tokenizer(tokenizer: Any, info: DatastoreInfo, allow_mismatch: bool = False) -> None:
    """Refuse a datastore built with a tokenizer that behaves differently from the model's."""
    mine = tokenizer_fingerprint(tokenizer)
    if info.tokenizer_fingerprint != mine:
        message = (
            f"the datastore was built with tokenizer {info.tokenizer_name} (fingerprint "
            f"{info.tokenizer_fingerprint}), but the model's tokenizer is "
            f"{tokenizer_name(tokenizer)} (fingerprint {mine}): its drafts would be ids of another "
            "vocabulary. Build the datastore with this model's tokenizer, or pass "
            "DecodingConfig(allow_tokenizer_mismatch=True) to use it anyway (output stays correct, "
            "drafts become useless)."
        )
        if not allow_mismatch:
            raise TokenizerMismatchError(message)
        log.warning("%s", message)
