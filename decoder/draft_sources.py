"""Where drafts come from, behind one interface: ``DraftSource.propose(context) -> Draft``.

The verifier only ever sees the merged ``DraftTree``; it does not know which source proposed what.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from decoder.draft_tree import EMPTY_DRAFT, Draft, count_trie
from rest.retriever import RetrievalSession
from rest.types import SearchParams

log = logging.getLogger(__name__)


class DraftSource(abc.ABC):
    """Proposes continuations of a context.

    ``context`` is the prompt plus the output so far and ends with the root; the proposed nodes
    continue after the root. ``failures`` counts proposals that gave nothing because something went
    wrong (not because nothing matched).
    """

    failures: int = 0

    @abc.abstractmethod
    def propose(self, context: Sequence[int]) -> Draft:
        """Scored continuations of ``context`` (``EMPTY_DRAFT`` when there are none)."""

    def close(self) -> None:
        """Release what the source holds (a retrieval session, a worker thread)."""


def scored_trie(sequences: Sequence[Sequence[int]]) -> Draft:
    """The trie of ``sequences``, a node scored by the share of sequences passing through it."""
    if not sequences:
        return EMPTY_DRAFT
    tokens, parents, counts = count_trie(sequences)
    total = len(sequences)
    return Draft(tuple(tokens), tuple(parents), tuple(c / total for c in counts))


class ContextDraftSource(DraftSource):
    """Prompt lookup: continuations of earlier occurrences of the context's own suffix.

    The longest suffix of ``max_ngram`` down to ``min_ngram`` tokens that occurred before wins; the
    next ``max_length`` tokens after each of its latest ``max_occurrences`` occurrences form the
    draft, a node scored by the share of those occurrences whose continuation passes through it.
    """

    def __init__(
        self,
        min_ngram: int = 1,
        max_ngram: int = 4,
        max_length: int = 10,
        max_occurrences: int = 64,
    ) -> None:
        self.min_ngram = min_ngram
        self.max_ngram = max_ngram
        self.max_length = max_length
        self.max_occurrences = max_occurrences

    def propose(self, context: Sequence[int]) -> Draft:
        ctx = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            # windows[j] = ctx[j : j + n] for every start j whose continuation is non-empty
            windows = np.lib.stride_tricks.sliding_window_view(ctx[:-1], n)  # [len - n, n]
            starts = np.flatnonzero((windows == ctx[-n:]).all(axis=1))
            if starts.size:
                latest = starts[-self.max_occurrences :]
                return scored_trie([ctx[j + n : j + n + self.max_length] for j in latest])
        return EMPTY_DRAFT


class RetrieverDraftSource(DraftSource):
    """Drafts from a datastore: a node scored by count / occurrences, the share of the matched
    suffix's occurrences that continue with the node's path."""

    def __init__(self, session: RetrievalSession, params: SearchParams) -> None:
        self.session = session
        self.params = params

    def propose(self, context: Sequence[int]) -> Draft:
        # Only the last max_span tokens can be matched: the rest need not travel to the retriever.
        result = self.session.search(list(context[-self.params.max_span :]), self.params)
        if result is None:
            self.failures += 1
            return EMPTY_DRAFT
        if not result.tokens or result.occurrences <= 0:
            return EMPTY_DRAFT
        return Draft(
            tuple(result.tokens),
            tuple(result.parents),
            tuple(c / result.occurrences for c in result.counts),
        )

    def close(self) -> None:
        self.session.close()


class _Worker:
    """One daemon thread running calls in order: a retrieval that never returns must neither
    block the decoder nor keep the interpreter from exiting."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="draft-source", daemon=True).start()

    def submit(self, fn: Callable[[], Draft]) -> Future:
        future: Future = Future()
        self._calls.put((fn, future))
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

    def propose(self, context: Sequence[int]) -> Draft:
        try:
            if self._worker is None:
                return self.source.propose(context)
            if self._pending is not None and not self._pending.done():
                self._own_failures += 1
                return EMPTY_DRAFT
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
        return EMPTY_DRAFT

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
