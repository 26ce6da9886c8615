"""The async engine: per-request queues on the event loop, one thread driving the decoder.

``admit`` checks a request and takes its place (or refuses it: ``Overloaded`` before any work,
``Unavailable`` while not serving), and returns its ``RequestStream``; ``updates`` yields what
each step emitted for it; leaving ``updates`` early (the client went away: ``CancelledError`` or
``GeneratorExit``) aborts it, and it leaves the batch at the next step boundary.

The decoder is called from the engine thread only: commands (add, abort) go to it through a
thread-safe queue and are applied between steps; each step's updates come back to the event loop
through ``call_soon_threadsafe``. When the decoder has nothing to do, the thread sleeps on the
command queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from decoder.batch import SequenceRequest, SequenceUpdate
from decoder.server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """Too many requests in flight: retry later (HTTP 429)."""


class Unavailable(Exception):
    """The engine is not serving: stopping, or failed (HTTP 503)."""


class EngineFailed(Exception):
    """A decoding step raised; every request in flight ends with this error."""


class RequestRefused(Exception):
    """The decoder refused one request when it was added (its other requests go on)."""


@dataclass
class RequestStream:
    """One admitted request: the updates the engine thread hands over, read on the event loop.
    ``error`` is set (and the queue woken) when the engine fails."""

    request: SequenceRequest
    admitted_at: float
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False
    first_token_at: float | None = None


@dataclass(frozen=True)
class _Add:
    request: SequenceRequest


@dataclass(frozen=True)
class _Abort:
    request_id: str


_STOP = object()


class AsyncEngine:
    """Runs ``decoder`` (``BatchDecoder``'s interface) on its own thread for the event loop that
    calls ``start``. At most ``max_in_flight`` requests are admitted at once (running or
    waiting); more are refused with ``Overloaded``."""

    def __init__(self, decoder: Any, metrics: ServerMetrics, max_in_flight: int = 64) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.decoder = decoder
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.failure: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- on the event loop ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="decoder-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def admit(self, request: SequenceRequest) -> RequestStream:
        """Take a place for ``request`` and hand it to the decoder. Raises ``Unavailable``,
        ``Overloaded``, or the decoder's ``validate`` error (a message for the user)."""
        if not self.running:
            raise Unavailable(self._unavailable_reason())
        if len(self._streams) >= self.max_in_flight:
            raise Overloaded(
                f"the server is overloaded ({len(self._streams)} requests in flight, at most "
                f"{self.max_in_flight}); retry later"
            )
        # validate reads only the decoder's settings, tokenizer and model config, so it may run
        # here while a step runs on the engine thread; it raises before any work is queued.
        self.decoder.validate(request)
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        stream = RequestStream(request, time.perf_counter())
        self._streams[request.request_id] = stream
        self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        self._commands.put(_Add(request))
        return stream

    async def updates(self, stream: RequestStream) -> AsyncIterator[SequenceUpdate]:
        """The request's updates until the one that finishes it. Leaving early aborts it."""
        try:
            while True:
                update = await stream.updates.get()
                if isinstance(update, BaseException):
                    raise update
                yield update
                if update.finish_reason is not None:
                    return
        finally:
            if not stream.finished:
                self.abort(stream.request.request_id)

    def abort(self, request_id: str) -> None:
        """Forget the request now; the decoder drops it at the next step boundary."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.finished = True
        self.metrics.requests.labels("abort").inc()
        self._commands.put(_Abort(request_id))

    def stop(self, timeout_s: float | None = None) -> None:
        """End the engine thread (requests still in flight are aborted)."""
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _unavailable_reason(self) -> str:
        if self.failure is not None:
            return f"the decoder failed ({self.failure!r}); the server must be restarted"
        return "the decoding engine is not running"

    def _deliver(self, updates: list[SequenceUpdate]) -> None:
        now = time.perf_counter()
        for update in updates:
            stream = self._streams.get(update.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if update.tokens and stream.first_token_at is None:
                stream.first_token_at = now
                self.metrics.time_to_first_token.observe(now - stream.admitted_at)
            if update.finish_reason is not None:
                del self._streams[update.request_id]
                stream.finished = True
                reason = "abort" if update.finish_reason == "abort" else (
                    "length" if update.finish_reason == "length" else "stop")
                self.metrics.requests.labels(reason).inc()
                self.metrics.request_latency.observe(now - stream.admitted_at)
            stream.updates.put_nowait(update)

    def _fail_one(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
            self.metrics.requests.labels("error").inc()
            stream.updates.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.finished = True
            self.metrics.requests.labels("error").inc()
            stream.updates.put_nowait(error)
        self._streams.clear()

    # -- on the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        decoder = self.decoder
        try:
            while True:
                if not self._apply(self._commands.get()):  # sleeps while there is nothing to do
                    return
                while decoder.has_work:
                    while not self._commands.empty():  # joins and leaves between steps only
                        if not self._apply(self._commands.get_nowait()):
                            return
                    updates, stats = decoder.step()
                    self.metrics.observe_step(stats, decoder.num_running, decoder.num_waiting)
                    if updates:
                        self._loop.call_soon_threadsafe(self._deliver, updates)
        except BaseException as exc:  # noqa: BLE001 - reported to every request and to /health
            log.exception("a decoding step failed; the engine stops")
            self.failure = exc
            error = EngineFailed(f"decoding failed: {exc!r}")
            try:
                self._loop.call_soon_threadsafe(self._fail_all, error)
            except RuntimeError:
                pass  # the event loop is already closed

    def _apply(self, command: object) -> bool:
        """Apply one command to the decoder; False for the stop command."""
        if command is _STOP:
            return False
        if isinstance(command, _Add):
            try:
                self.decoder.add(command.request)
            except Exception as exc:  # noqa: BLE001 - this request's error, not the engine's
                assert self._loop is not None
                error = RequestRefused(str(exc) or type(exc).__name__)
                self._loop.call_soon_threadsafe(self._fail_one, command.request.request_id, error)
        elif isinstance(command, _Abort):
            self.decoder.abort(command.request_id)
        return True
