"""Awaitable searches for the server's event loop, run by the datastore's search executor.

The executor (``rest.datastore.SearchExecutor``: native threads, see its docstring) runs each
search off the loop and makes a file descriptor readable when searches have finished; the loop
watches it with ``add_reader`` and resolves the waiting futures in one pass. Compared with handing
each search to a Python worker thread, this saves two GIL hand-offs per search, which were the
largest cost of a search on the server (bench/service_latency.py measures the whole path).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from rest.types import SearchParams


class AsyncSearches:
    """``await searches.search(...)`` on the running loop; ``executor`` is the datastore's."""

    def __init__(self, executor) -> None:
        self._executor = executor
        self._loop = asyncio.get_running_loop()
        self._tags = itertools.count()
        self._waiting: dict[int, asyncio.Future] = {}
        self._closing = False
        self._fd = executor.fileno()
        self._loop.add_reader(self._fd, self._collect)

    def search(
        self,
        context: Sequence[int],
        params: SearchParams,
        shards: Sequence[str] | None,
        timeout_s: float | None,
        *,
        levels: int = 1,
        session=None,
    ) -> asyncio.Future:
        """A future of the executor's result (``levels`` back-off levels as
        ``Datastore.search_levels`` gives them, or the serialized response of an ``as_wire``
        executor), or of the exception the search raised (``TimeoutError`` when it was still
        queued, or still running, ``timeout_s`` seconds from now). Cancelling the future (the call
        went away) gives the search up in the engine. ``session``: the stream's search session."""
        tag = next(self._tags)
        self._executor.submit(tag, context, params, shards, timeout_s, levels=levels,
                              session=session)
        future = self._waiting[tag] = self._loop.create_future()
        future.add_done_callback(lambda f: f.cancelled() and self._executor.cancel(tag))
        return future

    def _collect(self) -> None:
        for tag, outcome in self._executor.completed():
            future = self._waiting.pop(tag)
            if future.cancelled():  # the call went away while its search ran
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._closing and not self._waiting:
            self.close()

    def close_when_idle(self) -> None:
        """Takes no new searches; closes once the ones in flight have completed (a reload hands
        new searches to another datastore's executor meanwhile)."""
        self._closing = True
        if not self._waiting:
            self.close()

    def close(self) -> None:
        """Stop watching the executor and let its threads finish (call after the server stopped)."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
            self._executor.close()
