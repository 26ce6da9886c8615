"""Incremental n-gram indexes: where did the context's last n tokens occur before, and what came
after them?

``NgramIndex`` serves the context source (one index per generation, extended by the tokens each
step adds, never rescanned) and, a few at a time, ``ServedOutputs``: the outputs a generator has
already served, bounded in tokens, the oldest dropped first.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from decoder.draft_tree import PAD


class NgramIndex:
    """Where each n-gram of 1..``max_n`` tokens occurs in a growing buffer of documents.

    An occurrence is recorded as the position right after the n-gram, once a token is there:
    the n-gram that ends the buffer has nothing to continue yet. N-grams never span two
    documents, and continuations read with ``rows`` stop at the end of their document.
    """

    def __init__(self, max_n: int, capacity: int = 1024) -> None:
        if max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        self.max_n = max_n
        self._buffer = np.full(max(capacity, 2), PAD, dtype=np.int64)  # PAD past the end
        self._length = 0
        self._where: dict[tuple[int, ...], list[int]] = {}
        self._recent: tuple[int, ...] = ()  # the current document's last max_n tokens

    def __len__(self) -> int:
        """Tokens held, document separators included."""
        return self._length

    def extend(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the current document."""
        tokens = [int(t) for t in tokens]
        self._reserve(len(tokens))
        self._buffer[self._length : self._length + len(tokens)] = tokens
        where, max_n, recent, position = self._where, self.max_n, self._recent, self._length
        for token in tokens:
            for start in range(len(recent)):  # the n-grams that ``token`` now continues
                key = recent[start:]
                hits = where.get(key)
                if hits is None:
                    where[key] = [position]
                else:
                    hits.append(position)
            recent = (recent + (token,))[-max_n:]
            position += 1
        self._recent, self._length = recent, position

    def end_document(self) -> None:
        """Close the current document: what is appended next starts a new one."""
        self._reserve(1)
        self._length += 1  # the buffer already holds PAD there
        self._recent = ()

    def latest(self, ngram: tuple[int, ...], limit: int) -> list[int]:
        """The positions right after the latest ``limit`` occurrences of ``ngram``, oldest first."""
        hits = self._where.get(ngram)
        return hits[-limit:] if hits else []

    def rows(self, positions: Sequence[int], depth: int) -> np.ndarray:
        """``depth`` tokens from each position on, PAD past the end: [len(positions), depth]."""
        cells = np.asarray(positions, dtype=np.int64)[:, None] + np.arange(depth)
        return self._buffer.take(cells, mode="clip")  # clipped reads land on the last cell: PAD

    def _reserve(self, n: int) -> None:
        needed = self._length + n + 1  # the last cell always stays PAD
        if needed > len(self._buffer):
            grown = np.full(2 * needed, PAD, dtype=np.int64)
            grown[: self._length] = self._buffer[: self._length]
            self._buffer = grown


class ServedOutputs:
    """The outputs a generator has served, as n-gram indexes holding at most ``max_tokens``
    tokens: a new output goes to the newest of a few segments, and once the total passes the
    cap the oldest segment is dropped whole (an output longer than the cap keeps its end).

    ``native``: the indexes live in the engine (``rest._engine.ServedIndex``, in ``index``), where
    the native drafter reads them; otherwise they are ``NgramIndex`` segments, read by the
    reference drafting in Python. ``add`` takes a lock, as a generator may serve several threads;
    lookups need none (the structures only grow, or are replaced whole, and the GIL makes each
    change atomic; the engine's index has its own lock).
    """

    def __init__(self, max_n: int, max_tokens: int, segments: int = 4, native: bool = False) -> None:
        if max_tokens < 1 or segments < 1:
            raise ValueError("max_tokens and segments must be >= 1")
        self.max_n = max_n
        self.max_tokens = max_tokens
        self._segment_tokens = max(max_tokens // segments, 1)
        self._segments: list[NgramIndex] = []  # oldest first
        self._lock = threading.Lock()
        self.index = None
        if native:
            from rest._engine import ServedIndex

            self.index = ServedIndex(max_n, max_tokens, segments)

    @property
    def native(self) -> bool:
        return self.index is not None

    @property
    def tokens(self) -> int:
        """Tokens held, document separators included."""
        if self.index is not None:
            return self.index.tokens
        return sum(len(segment) for segment in self._segments)

    def add(self, output: Sequence[int]) -> None:
        """Remember one served output (the prompt is not part of it)."""
        if self.index is not None:
            self.index.add([int(t) for t in output])
            return
        output = list(output)[-(self.max_tokens - 1) :]  # with its separator, within the cap
        if not output:
            return
        with self._lock:
            newest = self._segments[-1] if self._segments else None
            if newest is None or len(newest) + len(output) + 1 > self._segment_tokens:
                newest = NgramIndex(self.max_n, capacity=min(self._segment_tokens,
                                                             len(output) + 1) * 2)  # fmt: skip
                self._segments.append(newest)
            newest.extend(output)
            newest.end_document()
            while self.tokens > self.max_tokens:
                self._segments.pop(0)

    def clear(self) -> None:
        if self.index is not None:
            self.index.clear()
        with self._lock:
            self._segments = []

    def segments(self) -> list[NgramIndex]:
        """The segments, newest first (a snapshot: ``add`` may replace the list meanwhile)."""
        if self.index is not None:
            raise RuntimeError("these served outputs are indexed in the engine: draft from them "
                               "with decoder.draft_sources.NativeDrafter")
        return self._segments[::-1]
