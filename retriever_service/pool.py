"""Worker threads that run blocking calls for an asyncio event loop.

``loop.run_in_executor`` with a ``ThreadPoolExecutor`` would do, but it wraps every call in a work
item, a ``concurrent.futures.Future`` and an asyncio future chained to it; on this service's hot
path (one search per decoding step, tens of microseconds of work) that bookkeeping cost about 1.6x
a bare hand-off through ``queue.SimpleQueue`` with the result posted back by
``call_soon_threadsafe`` (bench/service_latency.py measures the whole path).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class WorkerPool:
    """``await pool.run(fn, *args)`` runs ``fn(*args)`` on one of ``workers`` threads."""

    def __init__(self, workers: int, name: str = "worker") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name=f"{name}-{i}")
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            loop, future, fn, args = job
            if future.cancelled():  # the caller went away while this waited: skip the work
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:  # the loop was closed while this ran: nobody is waiting
                pass

    def shutdown(self) -> None:
        """Stop the threads once the queued work is done (does not wait for them)."""
        for _ in self._threads:
            self._jobs.put(_STOP)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
