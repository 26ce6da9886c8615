"""Where drafts come from, behind one interface: ``DraftSource.propose(context) -> levels``.

A source answers with levels (``decoder.draft_tree.Level``): for a few suffixes of the context
that it matched, the continuations that followed them, counted. One scorer turns every source's
levels into the step's draft tree (``draft_tree``); the verifier only ever sees that tree and
does not know which source proposed what.

Two implementations of the same rules: ``NativeDrafter`` does the context, the served outputs and
an in-process datastore in the engine, and scores every other source's levels (a remote
retriever's, extra sources') with them, in one call per step; the Python sources with
``DraftTree.from_levels`` are the reference (``DecodingConfig.drafting``).
"""

from __future__ import annotations

import abc
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace

import numpy as np

from decoder.config import DecodingConfig, NgramParams
from decoder.draft_tree import DraftTree, Level
from decoder.ngram_index import NgramIndex, ServedOutputs
from rest.retriever import RetrievalSession, Retriever
from rest.types import SearchParams

log = logging.getLogger(__name__)


class DraftSource(abc.ABC):
    """Proposes counted continuations of a context.

    ``context`` is the prompt plus the output so far and ends with the root; the proposed
    continuations start after the root. ``failures`` counts proposals that gave nothing because
    something went wrong (not because nothing matched). The sources ``open_draft_sources`` makes
    serve one generation, whose contexts each extend the previous one.
    """

    failures: int = 0

    @abc.abstractmethod
    def propose(self, context: Sequence[int]) -> list[Level]:
        """Levels of continuations of ``context`` (an empty list when there are none)."""

    def close(self) -> None:
        """Release what the source holds (a retrieval session, a worker thread)."""


def draft_tree(
    sources: Sequence[DraftSource],
    context: Sequence[int],
    budget: int | None = None,
    vocab_size: int | None = None,
) -> DraftTree:
    """One step's drafting: every source's levels, scored into one tree of at most ``budget``
    nodes (``DraftTree.from_levels``). With a ``NativeDrafter`` among the sources, it scores the
    others' levels with its own, in the engine."""
    native = next((source for source in sources if isinstance(source, NativeDrafter)), None)
    levels = [level for source in sources if source is not native for level in source.propose(context)]
    if native is not None:
        return native.draft(context, levels, budget, vocab_size)
    return DraftTree.from_levels(levels, budget=budget, vocab_size=vocab_size)


def served_outputs(config: DecodingConfig) -> ServedOutputs | None:
    """The store of served outputs ``config`` asks for (None: no served drafts), to be shared by
    every generation of one generator (indexed in the engine for native drafting)."""
    if not config.served_drafts:
        return None
    return ServedOutputs(config.served.max_ngram, config.served_max_tokens,
                         native=config.drafting == "native")  # fmt: skip


def open_draft_sources(
    config: DecodingConfig,
    retriever: Retriever | None = None,
    served: ServedOutputs | None = None,
    extra: Sequence[DraftSource] = (),
) -> list[DraftSource]:
    """The sources of one generation, as ``config`` asks: the context, the served outputs, the
    retriever (a session of its own, behind the deadline), then ``extra`` (shared sources,
    guarded so that their failures cost a step's drafts only). Close them when it ends.

    Native drafting puts the context, the served outputs and an in-process datastore in one
    ``NativeDrafter`` (first); a remote retriever stays a source of its own, scored with it."""
    sources: list[DraftSource] = []
    datastore = None
    served = served if config.served_drafts else None
    if config.drafting == "native" and (config.context_drafts or served or retriever or extra):
        datastore = in_process_datastore(retriever)
        if served is not None and not served.native:
            raise ValueError("native drafting needs served outputs indexed in the engine "
                             "(ServedOutputs(..., native=True), as served_outputs(config) makes)")
        sources.append(NativeDrafter(config, served, datastore))
    elif config.drafting == "python":
        if config.context_drafts:
            sources.append(ContextDraftSource(config.context))
        if served is not None:
            sources.append(ServedDraftSource(served, config.served))
    if retriever is not None and datastore is None:
        try:
            session = retriever.session()
        except Exception:
            log.warning("no retrieval session; decoding without it", exc_info=True)
        else:
            source = RetrieverDraftSource(
                session, config.search, config.retrieval_levels, config.retrieval_trust
            )
            sources.append(GuardedDraftSource(source, config.retrieval_deadline_s))
    sources.extend(GuardedDraftSource(source, None) for source in extra)
    return sources


def in_process_datastore(retriever: Retriever | None):
    """The engine's datastore behind a retriever that searches in this process (None for a
    remote one): a ``rest.datastore.Datastore`` in its ``datastore`` attribute."""
    from rest.datastore import Datastore

    datastore = getattr(retriever, "datastore", None)
    return datastore if isinstance(datastore, Datastore) else None


def _ngram_args(params: NgramParams) -> tuple:
    return (params.min_ngram, params.max_ngram, params.max_length, params.max_occurrences,
            float(params.trust))  # fmt: skip


def _level_args(level: Level) -> tuple:
    """A Level as the engine takes it (``rest._engine.score_levels``)."""
    if level.trie is not None:
        tokens, parents, counts = level.trie
        return (level.match_length, float(level.occurrences), float(level.trust), list(tokens),
                list(parents), [float(c) for c in counts])  # fmt: skip
    return (level.match_length, float(level.occurrences), float(level.trust), level.rows.tolist())


def score_in_engine(levels: Sequence[Level], budget: int | None = None,
                    vocab_size: int | None = None) -> DraftTree:
    """``DraftTree.from_levels`` computed by the engine (the same tree, scores equal to float
    rounding)."""
    from rest._engine import score_levels

    tokens, parents, scores = score_levels([_level_args(level) for level in levels], budget, vocab_size)
    return DraftTree(tokens, parents, scores)


class NativeDrafter(DraftSource):
    """The context, the served outputs and an in-process datastore, drafted in the engine
    (``rest._engine.Drafter``): the context and served-output n-gram indexes are kept there and
    extended as tokens arrive, the datastore's back-off levels are searched there, and each step's
    levels, with those of the other sources (``draft_tree`` hands them over), are scored there, in
    one call. The levels and the tree are those of the Python sources and ``from_levels`` (the
    reference); the deadline applies to the datastore searches. The datastore's answers for
    short suffixes are cached across generations with the served outputs
    (``ServedOutputs.search_cache``).

    A context that does not extend the last one starts the context index afresh.
    """

    def __init__(self, config: DecodingConfig, served: ServedOutputs | None, datastore=None) -> None:
        from rest._engine import Drafter
        from rest.datastore import _engine_query

        search = config.search
        deadline = config.retrieval_deadline_s
        self._engine = Drafter(
            context=_ngram_args(config.context) if config.context_drafts else None,
            served=served.index if served is not None else None,
            served_params=_ngram_args(config.served) if served is not None else None,
            datastore=datastore._native if datastore is not None else None,
            query=_engine_query(search, None)[0] if datastore is not None else None,
            levels=config.retrieval_levels,
            trust=float(config.retrieval_trust),
            deadline_us=None if deadline is None else max(int(deadline * 1e6), 1),
            cache=served.search_cache if served is not None and datastore is not None else None,
        )
        self._known = 0  # context tokens the engine holds
        self._tail: list[int] = []  # their last few, to tell a context that extends them

    @property
    def failures(self) -> int:  # type: ignore[override]
        return self._engine.failures

    def propose(self, context: Sequence[int]) -> list[Level]:
        raise TypeError("NativeDrafter scores in the engine: call draft_tree (or draft)")

    def draft(self, context: Sequence[int], levels: Sequence[Level] = (), budget: int | None = None,
              vocab_size: int | None = None) -> DraftTree:
        """The step's tree: the engine's levels and ``levels``, scored into ``budget`` nodes."""
        known = self._known
        if len(context) < known or list(context[max(known - 8, 0) : known]) != self._tail:
            self._engine.reset()
            known = 0
        new = [int(t) for t in context[known:]]
        extra = [_level_args(level) for level in levels]
        tokens, parents, scores = self._engine.draft(new, budget, vocab_size, extra)
        self._known = len(context)
        self._tail = [int(t) for t in context[-8:]]
        return DraftTree(tokens, parents, scores)


def ngram_levels(
    indexes: Sequence[NgramIndex], context: Sequence[int], params: NgramParams
) -> list[Level]:
    """For each n from ``params.max_ngram`` down to ``params.min_ngram`` whose n-gram (the
    context's last n tokens) occurred in ``indexes`` (newest first): one level, the
    continuations after its latest ``params.max_occurrences`` occurrences."""
    suffix = tuple(int(t) for t in context[-params.max_ngram :])
    found: list[tuple[int, list[tuple[int, list[int]]]]] = []  # (n, [(index number, positions)])
    for n in range(len(suffix), params.min_ngram - 1, -1):
        ngram, wanted, hits = suffix[-n:], params.max_occurrences, []
        for number, index in enumerate(indexes):
            positions = index.latest(ngram, wanted)
            if positions:
                hits.append((number, positions))
                wanted -= len(positions)
                if not wanted:
                    break
        if hits:
            found.append((n, hits))
    if not found:
        return []
    # One gather per index for all the levels: numpy calls cost more than the work they do here.
    per_index: dict[int, list[int]] = {}
    for _, hits in found:
        for number, positions in hits:
            per_index.setdefault(number, []).extend(positions)
    rows = {number: indexes[number].rows(positions, params.max_length)
            for number, positions in per_index.items()}  # fmt: skip
    taken = dict.fromkeys(rows, 0)
    levels = []
    for n, hits in found:
        parts = []
        for number, positions in hits:
            start = taken[number]
            taken[number] = start + len(positions)
            parts.append(rows[number][start : start + len(positions)])
        level_rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        levels.append(Level(n, len(level_rows), params.trust, rows=level_rows))
    return levels


class ContextDraftSource(DraftSource):
    """Prompt lookup with back-off: the continuations of earlier occurrences of the context's
    own suffixes, one level per suffix length that occurred (``NgramParams``).

    The index of the context grows with the tokens each step adds; a context that does not
    extend the previous one is indexed afresh.
    """

    def __init__(self, params: NgramParams = NgramParams()) -> None:
        self.params = params
        self._index = NgramIndex(params.max_ngram)
        self._known: list[int] = []

    def propose(self, context: Sequence[int]) -> list[Level]:
        known = len(self._known)
        if len(context) < known or list(context[:known]) != self._known:
            self._index, self._known, known = NgramIndex(self.params.max_ngram), [], 0
        new = [int(t) for t in context[known:]]
        self._index.extend(new)
        self._known.extend(new)
        return ngram_levels((self._index,), context, self.params)


class ServedDraftSource(DraftSource):
    """The continuations of the context's suffixes in outputs served before (``ServedOutputs``,
    filled by the generator when a generation ends: the current one is never among them)."""

    def __init__(self, served: ServedOutputs, params: NgramParams) -> None:
        if params.max_ngram > served.max_n:
            raise ValueError(
                f"the served outputs index n-grams up to {served.max_n} tokens, "
                f"not {params.max_ngram}"
            )
        self.served = served
        self.params = params

    def propose(self, context: Sequence[int]) -> list[Level]:
        return ngram_levels(self.served.segments(), context, self.params)


SPECIFIC_MATCH = 4  # tokens: a datastore match longer than this needs proportionally less trust


def match_trust(trust: float, match_length: int) -> float:
    """The trust of a datastore level: ``trust`` for a match of up to ``SPECIFIC_MATCH`` tokens,
    divided by match_length / SPECIFIC_MATCH beyond (a 16-token match takes a quarter): a long
    match is specific, and few occurrences of it are enough to believe it. The engine's drafter
    computes the same (``retriever_rs/core/src/draft/drafter.rs``)."""
    return trust * SPECIFIC_MATCH / max(match_length, SPECIFIC_MATCH)


class RetrieverDraftSource(DraftSource):
    """Drafts from a datastore with back-off: ``levels`` searches, the first for the longest
    matching suffix (``params``), each next one for the longest suffix shorter than the last
    match (``max_span`` = last match length - 1), each answer a level believed with
    ``match_trust(trust, its match length)``.

    All levels come from one ``RetrievalSession.search_levels`` call.
    """

    def __init__(
        self, session: RetrievalSession, params: SearchParams, levels: int = 1, trust: float = 0.0
    ) -> None:
        self.session = session
        self.params = params
        self.levels = levels
        self.trust = trust

    def propose(self, context: Sequence[int]) -> list[Level]:
        # Only the last max_span tokens can be matched: the rest need not travel.
        results = self.session.search_levels(
            list(context[-self.params.max_span :]), self.params, self.levels
        )
        if results is None:
            self.failures += 1
            return []
        return [
            Level.from_trie(r.match_length, r.occurrences, r.tokens, r.parents, r.counts,
                            match_trust(self.trust, r.match_length))
            for r in results
            if r.tokens and r.occurrences > 0
        ]  # fmt: skip

    def close(self) -> None:
        self.session.close()


class _Worker:
    """One daemon thread running calls in order: a retrieval that never returns must neither
    block the decoder nor keep the interpreter from exiting."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="draft-source", daemon=True).start()

    def submit(self, fn: Callable[[], list[Level]]) -> Future:
        future: Future = Future()
        # In the caller's context (contextvars): the current trace span goes with the call, so
        # that its searches are the generation's children.
        self._calls.put((functools.partial(contextvars.copy_context().run, fn), future))
        return future

    def stop(self) -> None:
        self._calls.put(None)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiting decoder, which logs it
                future.set_exception(exc)


class GuardedDraftSource(DraftSource):
    """A source whose failures and slowness cost one step's drafts, never the generation.

    With a deadline, proposals run on a worker thread; one that is late is abandoned (the step goes
    on without drafts) and, while it still runs, later steps get no drafts from this source either.
    """

    def __init__(self, source: DraftSource, deadline_s: float | None) -> None:
        self.source = source
        self.deadline_s = deadline_s
        self._worker = _Worker() if deadline_s is not None else None
        self._pending: Future | None = None
        self._own_failures = 0

    @property
    def failures(self) -> int:  # type: ignore[override]
        return self._own_failures + self.source.failures

    def propose(self, context: Sequence[int]) -> list[Level]:
        try:
            if self._worker is None:
                return self.source.propose(context)
            if self._pending is not None and not self._pending.done():
                self._own_failures += 1
                return []
            snapshot = tuple(context)  # the decoder extends its context while a late call runs
            self._pending = self._worker.submit(lambda: self.source.propose(snapshot))
            return self._pending.result(timeout=self.deadline_s)
        except FutureTimeout:
            log.debug("draft source %s missed its %.3fs deadline", self.source, self.deadline_s)
        except Exception:
            # Once loudly, then quietly: a retriever that is down would fail every step.
            level = logging.DEBUG if self._own_failures else logging.WARNING
            log.log(level, "draft source %s failed; steps go on without its drafts",
                    type(self.source).__name__, exc_info=True)  # fmt: skip
        self._own_failures += 1
        return []

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._worker.submit(self._close_source)  # after the late call, on its thread
        else:
            self._close_source()
        if self._worker is not None:
            self._worker.stop()

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception:
            log.warning("closing draft source %s failed", type(self.source).__name__, exc_info=True)
