"""Batched decoding: many sequences, one forward pass per step, each sequence exactly as alone.

A ``BatchDecoder`` holds the running sequences of a ``RestGenerator``. Every ``step``:

1. requests that were aborted leave, waiting requests join (continuous batching) up to
   ``max_batch``: each joining prompt is prefilled alone, exactly as ``generate`` prefills it, and
   its first token is chosen from the prefill's logits;
2. every other running sequence drafts its own tree (its own draft sources; a drafting step that
   fails becomes a plain step), cut to what its positions allow (``tree_limits``) and to the
   budget, which adapts to the batch (``choose_batch_budget``: as the batch fills, nodes cost more
   verification and trees shrink, down to none). The drafting time itself is spent before any
   budget is chosen: at a batch size where drafting, its time counted, was slower than a plain
   step (``drafting_pays``), steps skip drafting for a while and probe again (``DraftingGate``);
3. all the trees go through the model in one forward pass (padded, per-row positions, one 4D mask
   per row and per attention pattern, ``decoder.verify``); each sequence walks its own tree with its
   own logits processors, token history and random generator, and keeps its own accepted path in
   the KV cache;
4. finished sequences leave.

Padding, stale cache entries and the other rows are invisible to a row, so each sequence computes
what it would compute alone (greedy: the same tokens in float32; sampled: the same distribution).
Models whose rotary frequencies depend on the largest position in a pass (dynamic NTK, longrope)
give every sequence a pass of its own and its own rotary state.

The decoder is blocking: one thread drives it (``step`` until ``has_work`` is false); ``add``
and ``abort`` take effect at the next step boundary. Inside a step, the sequences draft at the
same time on a small pool of threads (their retrievals wait on the network or the engine, not on
each other); everything else runs on the calling thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from decoder.budget import choose_batch_budget, drafting_pays, synchronize
from decoder.draft_sources import DraftSource, draft_tree
from decoder.draft_tree import DraftTree
from decoder.kv_cache import BatchedCache
from decoder.model_support import (
    RopeState,
    check_request,
    pristine_rope_state,
    rebuild_inputs,
    restore_rope_state,
    save_rope_state,
    tree_limits,
)
from decoder.sampling import node_chooser
from decoder.settings import GenerationSettings, resolve_settings
from decoder.stats import GenerationStats
from decoder.stopping import StopChecker
from decoder.tracing import GenerationTrace
from decoder.verify import (
    RowTree,
    build_tree_batch,
    forward_as_generate,
    forward_plain,
    forward_tree_batch,
    prefill,
    walk_tree,
)

if TYPE_CHECKING:
    from decoder.generator import RestGenerator

log = logging.getLogger(__name__)

FINISH_REASONS = ("eos", "stop", "length", "abort")


@dataclass(frozen=True)
class SequenceRequest:
    """One generation to run in a batch.

    ``generation``: ``GenerationConfig`` keyword arguments (``temperature``, ``top_p``,
    ``top_k``, ``repetition_penalty``, ...) and ``seed``; missing ones come from the model's own
    generation config. ``stop``: strings and/or token-id sequences that end the output (kept in
    it). ``drafting=False``: plain steps for this request.
    """

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    generation: dict = field(default_factory=dict)
    stop: tuple = ()
    drafting: bool = True


@dataclass(frozen=True)
class SequenceUpdate:
    """What one step did for one request: the tokens it emitted, and once it has finished why
    (``"eos"``, ``"stop"``, ``"length"`` or ``"abort"``) and its statistics."""

    request_id: str
    tokens: list[int]
    finish_reason: str | None
    stats: GenerationStats | None


@dataclass(frozen=True)
class StepStats:
    """What one step did for the whole batch. ``batch_size``: sequences decoded by the step
    (joining ones included); ``draft_tokens``: draft nodes verified; ``accepted_draft_tokens``:
    those accepted; ``emitted_tokens``: tokens emitted; ``retrieval_s``: drafting time;
    ``retrieval_failures``: drafting failures of the step; ``verification_s``: forward passes,
    prefills and acceptance."""

    batch_size: int
    draft_tokens: int
    accepted_draft_tokens: int
    emitted_tokens: int
    retrieval_s: float
    retrieval_failures: int
    verification_s: float


class _Sequence:
    """A running request and everything that is its own: settings, stops, random generator,
    draft sources, context, rotary state, counters."""

    def __init__(
        self,
        request: SequenceRequest,
        settings: GenerationSettings,
        stopper: StopChecker,
        sources: list[DraftSource],
    ) -> None:
        self.request = request
        self.settings = settings
        self.stopper = stopper
        self.random = settings.generator()
        self.sources = sources
        self.context = list(request.prompt_ids)  # prompt + output; the last token is the root
        self.rope: RopeState | None = None
        self.cache: BatchedCache | None = None  # its own, when rows cannot share a pass
        self.start = time.perf_counter()
        self.steps = 0
        self.draft_tokens = 0
        self.drafting_failures = 0
        self.prefill_s = 0.0
        self.retrieval_s = 0.0
        self.verification_s = 0.0
        self.tree = DraftTree.empty()  # this step's
        # One trace per generation: the span is current while this sequence drafts.
        self.trace = GenerationTrace(len(request.prompt_ids), request.request_id)

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def finish_reason(self) -> str | None:
        return self.stopper.finish_reason

    def failures(self) -> int:
        return self.drafting_failures + sum(source.failures for source in self.sources)

    def stats(self) -> GenerationStats:
        return GenerationStats(
            prompt_tokens=len(self.request.prompt_ids),
            new_tokens=len(self.stopper.tokens),
            steps=self.steps,
            draft_tokens=self.draft_tokens,
            retrieval_failures=self.failures(),
            prefill_s=self.prefill_s,
            retrieval_s=self.retrieval_s,
            verification_s=self.verification_s,
            total_s=time.perf_counter() - self.start,
        )

    def context_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.context, device=device)  # [t]


class BatchDecoder:
    """Continuous batching over a ``RestGenerator``'s model, draft sources and budget.

    ``validate`` checks a request (``ValueError`` or ``DecoderError`` with one user-facing
    message); ``add`` queues it (checked first), to join at the next step boundary; ``abort``
    makes it leave at the next step boundary; ``step`` runs one step and returns each request's
    update and the step's statistics. ``RestGenerator.generate`` runs this same step with a batch
    of one.
    """

    def __init__(self, generator: RestGenerator, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.generator = generator
        self.model = generator.model
        self.profile = generator.profile
        self.max_batch = max_batch
        self._waiting: list[tuple[SequenceRequest, GenerationSettings, StopChecker]] = []
        self._running: list[_Sequence] = []
        self._aborted: set[str] = set()
        self._shared = BatchedCache()  # the rows of sequences that share forward passes
        self._pool: ThreadPoolExecutor | None = None  # drafts a step's sequences at once

    # --- the interface ------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._aborted)

    def validate(
        self, request: SequenceRequest, generation_config: GenerationConfig | None = None
    ) -> None:
        """Check ``request``; raises ``ValueError`` or ``DecoderError`` with one message for the
        user (empty prompt, token ids outside the vocabulary, prompt too long for the model's
        positions, invalid or unverifiable generation options...)."""
        self._prepare(request, generation_config)

    def add(self, request: SequenceRequest, generation_config: GenerationConfig | None = None) -> None:
        """Queue ``request`` (checked first, as ``validate``); ``generation_config``: a base
        configuration for its options instead of the model's own."""
        known = {r.request_id for r, *_ in self._waiting} | {s.id for s in self._running}
        if request.request_id in known:
            raise ValueError(f"request id {request.request_id!r} is already in the batch")
        settings, stopper = self._prepare(request, generation_config)
        if request.drafting:
            self.generator.check_retriever()
        self._waiting.append((request, settings, stopper))

    def _prepare(
        self, request: SequenceRequest, generation_config: GenerationConfig | None
    ) -> tuple[GenerationSettings, StopChecker]:
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: generation needs at least one token to follow")
        vocab = self.generator.vocab_size
        if any(not 0 <= int(t) < vocab for t in request.prompt_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        for stop in request.stop:
            if not isinstance(stop, str) and (
                not len(stop) or not all(isinstance(t, int) for t in stop)
            ):
                raise ValueError("a stop sequence must be a non-empty sequence of token ids")
        options = {**request.generation, "max_new_tokens": request.max_new_tokens}
        stop_strings = [s for s in request.stop if isinstance(s, str)]
        settings = resolve_settings(self.model, request.prompt_ids, generation_config, options,
                                    stop_strings)  # fmt: skip
        check_request(self.profile, len(request.prompt_ids), settings.max_new_tokens)
        stopper = StopChecker.for_settings(
            settings, [s for s in request.stop if not isinstance(s, str)],
            self.generator.tokenizer, request.prompt_ids,
        )  # fmt: skip
        return settings, stopper

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    @torch.inference_mode()
    def step(self) -> tuple[list[SequenceUpdate], StepStats]:
        updates: list[SequenceUpdate] = []
        totals = _Totals()
        self._leave_aborted(updates)
        decoding = list(self._running)  # those that were running before this step
        joined = self._join(updates, totals)
        try:
            self._decode(decoding, updates, totals)
        except BaseException:
            for seq, _ in joined:  # not in the batch yet: close() would not see them
                self._close(seq, None)
            raise
        for seq, cache in joined:  # their rows come after the running ones'
            if seq.finish_reason is not None:
                self._close(seq, seq.finish_reason)
                continue
            if self.profile.shares_rope_state:
                seq.cache = BatchedCache()
                seq.cache.append(cache, len(seq.context) - 1)
            else:
                self._shared.append(cache, len(seq.context) - 1)
            self._running.append(seq)
        self._leave_finished()
        stats = StepStats(
            batch_size=len(decoding) + len(joined),
            draft_tokens=totals.draft_tokens,
            accepted_draft_tokens=totals.accepted,
            emitted_tokens=totals.emitted,
            retrieval_s=totals.retrieval_s,
            retrieval_failures=totals.failures,
            verification_s=totals.verification_s,
        )
        return updates, stats

    def close(self) -> None:
        """Abort everything (closing the draft sources) without another step."""
        for seq in self._running:
            self._close(seq, "abort")
        self._running, self._waiting = [], []
        self._shared = BatchedCache()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    # --- joining and leaving ----------------------------------------------------------------

    def _leave_aborted(self, updates: list[SequenceUpdate]) -> None:
        if not self._aborted:
            return
        aborted, self._aborted = self._aborted, set()
        for request, *_ in [w for w in self._waiting if w[0].request_id in aborted]:
            empty = GenerationStats(len(request.prompt_ids), 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
            updates.append(SequenceUpdate(request.request_id, [], "abort", empty))
        self._waiting = [w for w in self._waiting if w[0].request_id not in aborted]
        for seq in self._running:
            if seq.id in aborted and seq.finish_reason is None:
                seq.stopper.finish_reason = "abort"
                updates.append(SequenceUpdate(seq.id, [], "abort", seq.stats()))
        self._leave_finished()

    def _join(self, updates: list[SequenceUpdate], totals: _Totals) -> list:
        """Prefill the requests that join: [(sequence, its one-row cache)]."""
        joined = []
        while self._waiting and len(self._running) + len(joined) < self.max_batch:
            seq = self._start(*self._waiting.pop(0))
            t0 = time.perf_counter()
            try:
                cache = self._prefill(seq)
            except BaseException:
                self._close(seq, None)
                raise
            seq.prefill_s = time.perf_counter() - t0
            totals.verification_s += seq.prefill_s
            totals.emitted += len(seq.stopper.tokens)
            self._report(seq, list(seq.stopper.tokens), updates)
            joined.append((seq, cache))
        return joined

    def _start(
        self, request: SequenceRequest, settings: GenerationSettings, stopper: StopChecker
    ) -> _Sequence:
        drafting = request.drafting and self.generator.config.tree_budget > 0
        sources = self.generator.open_sources() if drafting else []
        return _Sequence(request, settings, stopper, sources)

    def _prefill(self, seq: _Sequence):
        """``generate``'s prefill, alone; the first token from its logits. Returns the cache."""
        if self.profile.rope_kind == "dynamic":
            restore_rope_state(self.profile, pristine_rope_state(self.profile))
        cache, logits = prefill(self.model, seq.context)
        seq.rope = save_rope_state(self.profile)
        synchronize(self.model.device)
        token = self._choose(seq, logits[None], DraftTree.empty())(0)
        seq.steps += 1
        seq.stopper.extend([token])
        seq.context.append(token)
        return cache

    def _leave_finished(self) -> None:
        staying = [seq for seq in self._running if seq.finish_reason is None]
        if len(staying) == len(self._running):
            return
        shared = [seq for seq in self._running if seq.cache is None]
        self._shared.keep_rows([row for row, seq in enumerate(shared) if seq.finish_reason is None])
        for seq in self._running:
            if seq.finish_reason is not None:
                self._close(seq, seq.finish_reason)
        self._running = staying

    def _close(self, seq: _Sequence, reason: str | None) -> None:
        for source in seq.sources:
            try:
                source.close()
            except Exception:
                log.warning("closing draft source %s failed", type(source).__name__, exc_info=True)
        seq.cache = None
        seq.trace.end(reason, seq.stats() if reason is not None else None)
        if reason is not None and seq.request.drafting:
            self.generator.served_output(seq.stopper.tokens)

    def _report(self, seq: _Sequence, tokens: list[int], updates: list[SequenceUpdate]) -> None:
        reason = seq.finish_reason
        updates.append(SequenceUpdate(seq.id, tokens, reason, seq.stats() if reason else None))

    # --- one decoding step ------------------------------------------------------------------

    def _decode(
        self, sequences: list[_Sequence], updates: list[SequenceUpdate], totals: _Totals
    ) -> None:
        if not sequences:
            return
        t0 = time.perf_counter()
        rebuilt = []
        for seq in sequences:
            taken = self._rebuild_if_wanted(seq)
            if taken is not None:
                rebuilt.append(seq)
                totals.emitted += len(taken)
                self._report(seq, taken, updates)
        totals.verification_s += time.perf_counter() - t0
        sequences = [seq for seq in sequences if seq not in rebuilt]
        t0 = time.perf_counter()
        drafting = [seq for seq in sequences if seq.sources]
        gate = self.generator.drafting_gate
        if drafting and gate is not None and not gate.opens(len(sequences)):
            drafting = []  # drafting has not paid at this batch size lately: plain steps
        for seq in sequences:
            seq.tree = DraftTree.empty()
        failures = sum(seq.failures() for seq in drafting)
        if len(drafting) > 1:
            # The sequences' retrievals wait on their retrievers at the same time, not in turn.
            list(self._drafting_pool().map(self._draft, drafting))
        else:
            for seq in drafting:
                self._draft(seq)
        drafting_s = time.perf_counter() - t0
        totals.retrieval_s += drafting_s
        totals.failures += sum(seq.failures() for seq in drafting) - failures
        verdicts = []
        for group in self._groups(sequences):
            verdicts.append(self._budget(group, drafting_s))
            self._verify(group, updates, totals)
        verdicts = [paid for paid in verdicts if paid is not None]
        if gate is not None and verdicts:
            gate.observe(len(sequences), any(verdicts))

    def _drafting_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_batch, thread_name_prefix="drafting")
        return self._pool

    def _rebuild_if_wanted(self, seq: _Sequence) -> list[int] | None:
        """Phi-3 longrope: at the crossing, the model's own input preparation drops the cache and
        ``generate`` feeds the whole context again; so does this (a plain step). Returns the
        emitted tokens, or None when no rebuild was wanted."""
        if seq.cache is None:
            return None
        inputs = rebuild_inputs(self.model, self.profile, seq.context, seq.cache.cache)
        if inputs is None:
            return None
        cache, logits = forward_as_generate(self.model, inputs, len(seq.context))
        seq.cache = BatchedCache()
        seq.cache.append(cache, len(seq.context))
        token = self._choose(seq, logits[None], DraftTree.empty())(0)
        seq.steps += 1
        taken = seq.stopper.extend([token])
        seq.context.extend(taken)
        return taken

    def _draft(self, seq: _Sequence) -> None:
        """This step's tree for ``seq`` (its own sources and state only: sequences draft at the
        same time)."""
        prefix_len = len(seq.context) - 1
        depth, nodes = tree_limits(self.profile, prefix_len, seq.stopper.tokens_left, seq.rope)
        t0 = time.perf_counter()
        if depth > 0:
            try:
                with seq.trace.drafting():
                    tree = draft_tree(seq.sources, seq.context,
                                      self.generator.config.tree_budget, self.generator.vocab_size)
                seq.tree = limit_depth(tree, depth)
                if nodes is not None:
                    seq.tree = seq.tree.prune(nodes)
            except Exception:
                # Retrieval is an optimisation: a drafting step that fails is a plain step.
                level = logging.DEBUG if seq.drafting_failures else logging.WARNING
                log.log(level, "drafting failed; this step verifies no drafts", exc_info=True)
                seq.drafting_failures += 1
        seq.retrieval_s += time.perf_counter() - t0

    def _groups(self, sequences: list[_Sequence]) -> list[list[_Sequence]]:
        """Sequences that share one forward pass (those with a cache of their own go alone)."""
        shared = [seq for seq in sequences if seq.cache is None]
        alone = [[seq] for seq in sequences if seq.cache is not None]
        return ([shared] if shared else []) + alone

    def _budget(self, group: list[_Sequence], drafting_s: float) -> bool | None:
        """Cut the group's trees to the adaptive budget; returns whether drafting paid
        (``drafting_pays``), or None when nothing was drafted or the budget is fixed."""
        config = self.generator.config
        drafted = [seq for seq in group if len(seq.tree)]
        if not config.adaptive or not drafted:
            return None
        correction = self.generator.score_correction
        ranked = []
        for seq in group:
            scores = seq.tree.ranked_scores()
            ranked.append(correction.correct(scores) if correction is not None else scores)
        cost = self.generator.verification_cost(len(group))
        if self.generator.cost_correction is not None:
            cost = self.generator.cost_correction.correct(len(group), cost)
        cap = choose_batch_budget(ranked, cost, drafting_s, config.max_budget)
        for seq in group:
            seq.tree = seq.tree.prune(cap)
        return drafting_pays(ranked, cost, drafting_s, cap)

    def _verify(self, group: list[_Sequence], updates: list[SequenceUpdate], totals: _Totals) -> None:
        t0 = time.perf_counter()
        kv = group[0].cache if group[0].cache is not None else self._shared
        if group[0].cache is not None and self.profile.rope_kind == "dynamic":
            restore_rope_state(self.profile, group[0].rope)
        rows = [RowTree(seq.context[-1], seq.tree.tokens, seq.tree.parents) for seq in group]
        width = kv.width
        if len(group) == 1 and len(kv) == 1 and not len(group[0].tree):
            logits = forward_plain(self.model, kv, rows[0].root)  # [1, 1, vocab]
        else:
            batch = build_tree_batch(rows, kv.lengths, width, self.profile, self.model.dtype,
                                     self.model.device)  # fmt: skip
            logits = forward_tree_batch(self.model, self.profile, kv, batch)  # [rows, n, vocab]
        if group[0].cache is not None:
            group[0].rope = save_rope_state(self.profile)
        kept, emitted_by_row = [], []
        argmax = None
        if all(seq.settings.greedy and not len(seq.settings.processors) for seq in group):
            argmax = logits.argmax(dim=-1).tolist()  # one device sync for the whole batch
        for row, seq in enumerate(group):
            if argmax is not None:
                choose = argmax[row].__getitem__
            else:
                choose = self._choose(seq, logits[row], seq.tree)
            accepted, emitted = walk_tree(_children(seq.tree), choose)
            kept.append(accepted)
            emitted_by_row.append(emitted)
        kv.commit(width, kept)
        synchronize(self.model.device)
        elapsed = time.perf_counter() - t0
        totals.verification_s += elapsed
        costs = self.generator.cost_correction
        model = self.generator.costs.known(len(group)) if costs is not None else None
        if model is not None:  # plain steps too: they tell what a step costs without drafts
            widest = max(len(seq.tree) for seq in group)
            costs.observe(len(group), float(model.cost(widest + 1)), elapsed)
        correction = self.generator.score_correction
        for seq, accepted, emitted in zip(group, kept, emitted_by_row):
            if correction is not None and seq.sources:
                correction.observe(sum(seq.tree.scores), len(accepted) - 1)
            taken = seq.stopper.extend(emitted)
            seq.context.extend(taken)
            seq.steps += 1
            seq.draft_tokens += len(seq.tree)
            seq.verification_s += elapsed
            totals.draft_tokens += len(seq.tree)
            totals.accepted += len(accepted) - 1
            totals.emitted += len(taken)
            self._report(seq, taken, updates)

    def _choose(self, seq: _Sequence, logits: torch.Tensor, tree: DraftTree):
        settings = seq.settings
        context = None
        if len(settings.processors):
            context = seq.context_tensor(logits.device)
        return node_chooser(logits, context, tree.tokens, tree.parents, settings.processors,
                            settings.greedy, seq.random)  # fmt: skip


@dataclass
class _Totals:
    draft_tokens: int = 0
    accepted: int = 0
    emitted: int = 0
    retrieval_s: float = 0.0
    failures: int = 0
    verification_s: float = 0.0


def _children(tree: DraftTree) -> list[dict[int, int]]:
    """Tree index -> {token: child's tree index} (root = 0, draft node i = i + 1)."""
    children: list[dict[int, int]] = [{} for _ in range(len(tree) + 1)]
    for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        children[parent + 1][int(token)] = node + 1
    return children


def limit_depth(tree: DraftTree, max_depth: int) -> DraftTree:
    """The nodes of ``tree`` at depth ``max_depth`` or less (a tree: depth grows along paths)."""
    depths = tree.depths()
    if not depths or max(depths) <= max_depth:
        return tree
    kept = [i for i, d in enumerate(depths) if d <= max_depth]
    renumber = {old: new for new, old in enumerate(kept)}
    return DraftTree(
        [tree.tokens[i] for i in kept],
        [renumber[tree.parents[i]] if tree.parents[i] >= 0 else -1 for i in kept],
        [tree.scores[i] for i in kept],
    )
