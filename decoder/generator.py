"""Lossless retrieval-based speculative decoding for a Hugging Face causal LM.

One step, top to bottom: the draft sources propose levels of counted continuations of the
context; one scorer turns them into a draft tree, pruned to the budget; the root and the draft
nodes go through the model in one forward pass with tree attention; the tree walk accepts the path
the model itself would have produced and adds the bonus token; the KV cache keeps only the
accepted path; stop conditions are checked token by token. When the call ends, its output joins
the served outputs that later calls draft from. Terms are defined in the package docstring
(``decoder/__init__.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from decoder.budget import CostModel, ScoreCorrection, calibrate, choose_budget, synchronize
from decoder.config import DecodingConfig
from decoder.draft_sources import DraftSource, draft_tree, open_draft_sources, served_outputs
from decoder.draft_tree import DraftTree
from decoder.errors import TokenizerMismatchError
from decoder.kv_cache import keep_accepted, new_cache
from decoder.model_support import check_length, check_model
from decoder.ngram_index import ServedOutputs
from decoder.sampling import SamplingParams, node_chooser
from decoder.stopping import StopChecker, eos_token_ids
from decoder.tracing import GenerationTrace
from decoder.verify import prefill, verify_tree, walk_tree
from rest.retriever import Retriever
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from rest.types import DatastoreInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationStats:
    """What one ``generate`` call did. Times are wall-clock seconds; ``retrieval_s`` covers the
    drafting (every source and the scoring), ``verification_s`` the forward passes over the trees
    with their acceptance."""

    prompt_tokens: int
    new_tokens: int
    steps: int
    draft_tokens: int
    retrieval_failures: int
    prefill_s: float
    retrieval_s: float
    verification_s: float
    total_s: float

    @property
    def accepted_draft_tokens(self) -> int:
        """Tokens gained over plain decoding (which emits one per step)."""
        return self.new_tokens - self.steps

    @property
    def mean_accepted(self) -> float:
        """M: new tokens per step (1 for plain decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        derived = ("accepted_draft_tokens", "mean_accepted", "tokens_per_s")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


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
    fingerprint must match ``tokenizer``'s unless ``config.allow_tokenizer_mismatch``.
    ``draft_sources``: more proposers, shared by every call (they must not keep per-call state).
    ``served``: the outputs of earlier calls (prompts excluded), added as each call ends.
    ``score_correction``: how far recent steps bore out the draft scores (the adaptive budget
    uses it). Batch size is 1; the model must pass ``decoder.model_support.check_model``.
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
        self.config = config
        self.draft_sources = tuple(draft_sources)
        self.cost_model: CostModel | None = None
        self.served: ServedOutputs | None = served_outputs(config)
        self.score_correction: ScoreCorrection | None = None
        if config.score_correction:
            self.score_correction = ScoreCorrection(config.score_correction_decay)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.eos_ids = eos_token_ids(model)
        if retriever is not None:
            check_tokenizer(tokenizer, retriever.info(), config.allow_tokenizer_mismatch)
        check_model(model)

    def calibrate(self) -> CostModel:
        """Measure verification cost per tree size (done once, on first use of the auto budget)."""
        if self.cost_model is None:
            self.cost_model = calibrate(
                self.model,
                self.config.max_budget,
                self.config.calibration_prefix,
                self.config.calibration_repeats,
            )
        return self.cost_model

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | torch.Generator | None = None,
        stop: Sequence[str | Sequence[int]] = (),
        plain: bool = False,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text or token ids).

        ``temperature == 0`` is greedy; otherwise ``top_p``/``top_k`` filter as in transformers
        and ``seed`` (an int, or a CPU ``torch.Generator``) makes the draws repeatable.
        ``stop``: strings and/or token-id sequences that end the output (included). ``plain``:
        no drafts at all, the autoregressive baseline running the same code.
        """
        steps = self._start(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, plain)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | torch.Generator | None = None,
        stop: Sequence[str | Sequence[int]] = (),
        plain: bool = False,
    ) -> GenerationStream:
        """Like ``generate``, as an iterator of ``StreamChunk``s (one per step)."""
        steps = self._start(prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, plain)
        return GenerationStream(steps, self.tokenizer)

    def _start(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | torch.Generator | None,
        stop: Sequence[str | Sequence[int]],
        plain: bool,
    ) -> Generator[list[int], None, GenerationResult]:
        """Check the request and get its steps ready (they run as they are iterated)."""
        ids = self.encode(prompt)
        check_length(self.model.config, len(ids), max_new_tokens)
        sampling = SamplingParams(temperature, top_p, top_k)
        stopper = StopChecker(max_new_tokens, self.eos_ids, stop, self.tokenizer)
        generator = None
        if isinstance(seed, torch.Generator):
            generator = seed  # the caller's CPU generator, which the draws advance
        elif not sampling.greedy:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        if not plain and self.config.adaptive:
            self.calibrate()
        return self._steps(ids, sampling, generator, stopper, plain)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: generation needs at least one token to follow")
        return [int(i) for i in ids]

    @torch.inference_mode()
    def _steps(
        self,
        ids: list[int],
        sampling: SamplingParams,
        generator: torch.Generator | None,
        stopper: StopChecker,
        plain: bool,
    ) -> Generator[list[int], None, GenerationResult]:
        """Yield each step's new tokens; return the result."""
        start = time.perf_counter()
        generation = GenerationTrace(len(ids))  # its searches' spans are its children
        sources = [] if plain else self._open_sources()
        steps = draft_tokens = 0
        retrieval_s = verification_s = 0.0
        try:
            cache = new_cache()
            context = list(ids)  # prompt + output; the last token is the root, not yet in the cache
            prefill(self.model, cache, context[:-1])
            synchronize(self.model.device)
            prefill_s = time.perf_counter() - start
            while stopper.finish_reason is None:
                t0 = time.perf_counter()
                with generation.drafting():
                    tree = self._draft(sources, context)
                t1 = time.perf_counter()
                tree = tree.prune(self._budget(tree, t1 - t0))
                accepted, emitted = self._verify(cache, context, tree, sampling, generator)
                if self.score_correction is not None and not plain:
                    self.score_correction.observe(sum(tree.scores), accepted)
                emitted = stopper.extend(emitted)
                context.extend(emitted)
                retrieval_s += t1 - t0
                verification_s += time.perf_counter() - t1
                steps += 1
                draft_tokens += len(tree)
                yield emitted
        finally:
            if stopper.finish_reason is None:  # stopped early: the span ends without figures
                generation.end()
            failures = sum(source.failures for source in sources)
            for source in sources:
                source.close()
            if self.served is not None and not plain:
                # Later calls may draft from it. Plain calls leave no trace: a baseline run must
                # not feed the drafted run that it is compared with.
                self.served.add(stopper.tokens)
        stats = GenerationStats(
            prompt_tokens=len(ids),
            new_tokens=len(stopper.tokens),
            steps=steps,
            draft_tokens=draft_tokens,
            retrieval_failures=failures,
            prefill_s=prefill_s,
            retrieval_s=retrieval_s,
            verification_s=verification_s,
            total_s=time.perf_counter() - start,
        )
        generation.end(stopper.finish_reason, stats)
        text = self.tokenizer.decode(stopper.tokens, skip_special_tokens=True)
        return GenerationResult(list(stopper.tokens), text, stopper.finish_reason, stats)

    def _open_sources(self) -> list[DraftSource]:
        return open_draft_sources(self.config, self.retriever, self.served, self.draft_sources)

    def _draft(self, sources: Sequence[DraftSource], context: list[int]) -> DraftTree:
        return draft_tree(sources, context, self.config.tree_budget, self.vocab_size)

    def _budget(self, tree: DraftTree, retrieval_s: float) -> int:
        if not self.config.adaptive or not len(tree):
            return self.config.tree_budget
        assert self.cost_model is not None
        scores = tree.ranked_scores()
        if self.score_correction is not None:
            scores = self.score_correction.correct(scores)
        return choose_budget(scores, self.cost_model, retrieval_s, self.config.max_budget)

    def _verify(
        self,
        cache: Any,
        context: list[int],
        tree: DraftTree,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, list[int]]:
        """One forward pass over root + tree; the cache keeps the accepted path. Returns the
        number of accepted draft nodes and the emitted tokens: the accepted path's, then the
        bonus token."""
        prefix_len = len(context) - 1
        inputs = tree.linearise(context[-1], prefix_len, self.model.dtype, self.model.device)
        logits = verify_tree(self.model, cache, inputs)  # [n_tree, vocab]
        accepted, emitted = walk_tree(inputs.children, node_chooser(logits, sampling, generator))
        keep_accepted(cache, prefix_len, accepted)
        return len(accepted) - 1, emitted


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
