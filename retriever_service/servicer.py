"""The ``rest.retriever.v1.Retriever`` service: validate, admit, search off the event loop, answer.

A search runs on a worker thread because the engine's search is blocking native code that releases
the GIL: the event loop keeps accepting and answering other calls while searches run on the
workers. Admission is counted on the event loop (a plain integer, no lock: only the loop touches
it), and a search that would exceed the concurrency limit is refused at once with
RESOURCE_EXHAUSTED instead of queueing without bound.
"""

from __future__ import annotations

import time

import grpc

from rest.types import SearchResult
from retriever_service import wire
from retriever_service.pool import WorkerPool
from retriever_service.telemetry import SearchTelemetry
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from retriever_service.validation import (
    ParsedSearch,
    RequestError,
    RequestLimits,
    SearchRequestParser,
    engine_error,
)


def deadline_expired() -> RequestError:
    return RequestError(
        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the search started; not searched"
    )


class RetrieverServicer(pb_grpc.RetrieverServicer):
    """Searches ``datastore`` (a ``rest.datastore.Datastore`` or anything with its methods)."""

    def __init__(
        self,
        datastore,
        pool: WorkerPool,
        *,
        max_concurrent_searches: int,
        max_context_tokens: int,
        telemetry: SearchTelemetry | None = None,
    ) -> None:
        self._datastore = datastore
        self._pool = pool
        self._max_in_flight = max_concurrent_searches
        self._in_flight = 0
        info = datastore.info()
        self._info = wire.info_response(info)
        self._parser = SearchRequestParser(RequestLimits(
            vocab_size=info.vocab_size,
            max_context_tokens=max_context_tokens,
            shards=tuple(datastore.shard_names),
        ))
        self._telemetry = telemetry

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return self._info

    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        return await self._answer(request, context, "Search")

    async def SearchStream(self, request_iterator, context):
        # One response per request, in order: the next request is only read once this one's
        # response has been handed to gRPC.
        async for request in request_iterator:
            yield await self._answer(request, context, "SearchStream")

    async def _answer(self, request: pb.SearchRequest, context, method: str) -> pb.SearchResponse:
        try:
            if self._telemetry is None:
                result = await self._search(request, context)
            else:
                with self._telemetry.search(method) as record:
                    record.result = result = await self._search(request, context)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        return wire.search_response(result)

    async def _search(self, request: pb.SearchRequest, context) -> SearchResult:
        parsed = self._parser.parse(request)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        if deadline is not None and remaining <= 0:
            raise deadline_expired()
        if self._in_flight >= self._max_in_flight:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self._in_flight} searches in flight (limit"
                f" {self._max_in_flight}); retry later or on another replica",
            )
        self._in_flight += 1
        try:
            return await self._pool.run(self._run, parsed, deadline)
        finally:
            self._in_flight -= 1

    def _run(self, parsed: ParsedSearch, deadline: float | None) -> SearchResult:
        """On a worker thread. The deadline is checked again here: the call may have waited."""
        if deadline is not None and time.monotonic() >= deadline:
            raise deadline_expired()
        try:
            return self._datastore.search(parsed.context, parsed.params, shards=parsed.shards)
        except (KeyError, ValueError) as exc:
            raise engine_error(exc) from exc
