"""The progress bar of a datastore build: percent and time left when the input's size is known,
with the log messages and warnings of libraries printed above it instead of through it."""

from __future__ import annotations

import logging
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class BuildProgress:
    """``with BuildProgress(total_bytes) as bar: bar.update(bytes_read, tokens)``.

    While the bar is shown (on a terminal), rich replaces ``sys.stderr`` and ``sys.stdout`` with
    proxies that print above it; ``warnings`` finds them there. Logging handlers made earlier
    (``transformers`` makes its own on import) still hold the real stream, so for the duration
    they are pointed at the proxies too, and restored afterwards.
    """

    def __init__(self, total_bytes: int | None, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.total = total_bytes or None
        columns: list[Any] = [TextColumn("[bold cyan]datastore")]
        if self.total:
            columns += [BarColumn(), TaskProgressColumn(), DownloadColumn(), TextColumn("eta"), TimeRemainingColumn()]
        else:
            columns += [BarColumn(), TimeElapsedColumn()]
        columns.append(TextColumn("{task.fields[tokens]:,} tokens"))
        self._progress = Progress(*columns, console=console or Console(stderr=True), transient=False)
        self._task = None
        self._handlers: list[tuple[logging.StreamHandler, Any]] = []

    def __enter__(self) -> BuildProgress:
        if not self.enabled:
            return self
        streams = {id(sys.stderr): "stderr", id(sys.__stderr__): "stderr",
                   id(sys.stdout): "stdout", id(sys.__stdout__): "stdout"}
        self._task = self._progress.add_task("build", total=self.total, tokens=0)
        self._progress.start()
        for handler in _stream_handlers():
            if id(handler.stream) in streams:
                proxy = getattr(sys, streams[id(handler.stream)])
                if proxy is not handler.stream:  # rich redirects only on a terminal
                    self._handlers.append((handler, handler.stream))
                    handler.setStream(proxy)
        return self

    def update(self, bytes_read: int, tokens: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, completed=bytes_read, tokens=tokens)

    def __exit__(self, *exc: object) -> None:
        if self._task is None:
            return
        if exc[0] is None and self.total:
            self._progress.update(self._task, completed=self.total)
        if exc[0] is not None:
            self._progress.live.transient = True  # the error's one line, not a stalled bar
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
        self._progress.stop()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    return [
        handler
        for logger in loggers
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]
