"""The ``rest.retriever.v1.Retriever`` service: validate, admit, search off the event loop, answer.

A search runs on the datastore's search executor (native worker threads; ``searches.py``): the
event loop keeps accepting and answering other calls while searches run. The one exception is
cheap: when no other search is in flight, a search first gets a short, bounded slice on the loop
(``inline_search_s`` per back-off level the request asks for), because waking a worker and then
the loop costs more than most searches.
Admission is counted on the event loop (a plain integer, no lock: only the loop touches it), and
a search that would exceed the concurrency limit is refused at once with RESOURCE_EXHAUSTED
instead of queueing without bound. Requests reach the handlers as bytes and are decoded by
``validation.decode`` (a malformed one is INVALID_ARGUMENT, not gRPC's UNKNOWN); search responses
are serialized by the engine (``add_to_server``). A search tried inline on an untraced server is
decoded and checked by the engine in the same call (``Datastore.try_search_request``, the checks of
``validation`` mirrored in retriever_rs/python/src/wire.rs); any request those checks do not accept
takes the Python path, which answers or refuses it as ever.
"""

from __future__ import annotations

import grpc

from rest.datastore import DatastoreError
from retriever_service import wire
from retriever_service.searches import AsyncSearches
from retriever_service.telemetry import SearchTelemetry, search_context
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from retriever_service.validation import (
    DEFAULT_POLICY_CAPS,
    RequestError,
    RequestLimits,
    SearchRequestParser,
    decode,
    engine_error,
)

SERVICE = pb.DESCRIPTOR.services_by_name["Retriever"]


def deadline_expired() -> RequestError:
    return RequestError(
        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the search started; not searched"
    )


class RetrieverServicer(pb_grpc.RetrieverServicer):
    """Searches ``datastore`` (a ``rest.datastore.Datastore`` or anything with its methods)."""

    def __init__(
        self,
        datastore,
        searches: AsyncSearches,
        *,
        max_concurrent_searches: int,
        max_context_tokens: int,
        inline_search_s: float = 0.0,
        telemetry: SearchTelemetry | None = None,
        policy_caps=DEFAULT_POLICY_CAPS,
    ) -> None:
        self._max_in_flight = max_concurrent_searches
        self._in_flight = 0
        self._inline_search_s = inline_search_s
        self._max_context_tokens = max_context_tokens
        self._policy_caps = policy_caps
        self._telemetry = telemetry
        self._native = None  # the native search port (native.NativeSearchPort), when opened
        if telemetry is not None:
            telemetry.observe_in_flight(lambda: self._in_flight + self.native_in_flight)
        self.use_datastore(datastore, searches)

    def use_datastore(self, datastore, searches: AsyncSearches) -> None:
        """Serves ``datastore`` from now on (a reload): searches already running finish on the
        previous one."""
        self._datastore = datastore
        self._searches = searches
        info = datastore.info()
        self._info = wire.info_response(info)
        limits = RequestLimits(
            vocab_size=info.vocab_size,
            max_context_tokens=self._max_context_tokens,
            shards=tuple(datastore.shard_names),
            policy_caps=self._policy_caps,
        )
        self._parser = SearchRequestParser(limits)
        # The same checks in the engine, for the inline search of a request given as bytes (a
        # stand-in datastore without try_search_request always takes the Python path).
        self._engine_limits = (limits.for_engine() if hasattr(datastore, "try_search_request")
                               else None)  # fmt: skip
        if self._native is not None:
            self._info.search_port = self._native.port
            self._native.use_datastore(datastore, self._engine_limits, self._info)

    def attach_native(self, native) -> None:
        """Serve the searches also on ``native`` (a ``native.NativeSearchPort``), which sees every
        datastore this servicer serves from now on (reloads included) and asks this servicer for
        the rare answers it leaves to Python (``native_parse``, ``native_engine_error``); Info
        advertises its port."""
        self._native = native
        self._info.search_port = native.port
        native.use_datastore(self._datastore, self._engine_limits, self._info)

    def native_serving(self) -> tuple:
        """``(datastore, engine limits, InfoResponse)`` that a native port starts with; a stand-in
        datastore without the engine's request checks cannot be served natively."""
        if self._engine_limits is None:
            raise ValueError("--search-port needs the engine's datastore (a rest.datastore.Datastore)")
        return self._datastore, self._engine_limits, self._info

    @property
    def native_in_flight(self) -> int:
        return 0 if self._native is None else self._native.in_flight

    def native_parse(self, data: bytes) -> tuple:
        """For the native port, a request its engine checks leave to Python, as ``_search`` reads
        it: ``("refuse", status code, message)``, or ``("search", context, (min_span, max_span,
        budget, max_depth, policy), shards, levels)``."""
        try:
            parsed = self._parser.parse(decode(pb.SearchRequest, data))
        except RequestError as exc:
            return ("refuse", exc.code.value[0], exc.message)
        p = parsed.params
        return ("search", parsed.context, (p.min_span, p.max_span, p.budget, p.max_depth, p.policy),
                parsed.shards, parsed.levels)

    @staticmethod
    def native_engine_error(exc: Exception) -> tuple[int, str]:
        """For the native port, an engine exception's status, as ``_search`` maps it."""
        error = engine_error(exc)
        return error.code.value[0], error.message

    async def Info(self, request: bytes, context) -> pb.InfoResponse:
        try:
            decode(pb.InfoRequest, request)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        return self._info

    async def Search(self, request: bytes, context) -> bytes:
        return await self._answer(request, context, "Search", None)

    async def SearchStream(self, request_iterator, context):
        # One response per request, in order: the next request is only read once this one's
        # response has been handed to gRPC. A stream is one decoding session: its searches share
        # an engine search session, which narrows what the stream's last search found (the same
        # answers, found faster; see rest.datastore.SearchSession).
        session = self._datastore.session()
        async for request in request_iterator:
            yield await self._answer(request, context, "SearchStream", session)

    async def _answer(self, request: bytes, context, method: str, session) -> bytes:
        try:
            if self._telemetry is None:
                answer = self._try_request(request, context, session)
                if isinstance(answer, bytes):
                    return answer
                # None: not tried, or a request for the Python parser; False: tried inline.
                return await self._search(decode(pb.SearchRequest, request), context, session,
                                          inline=answer is None)
            return await self._traced_search(request, context, method, session)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    async def _traced_search(self, data: bytes, context, method: str, session) -> bytes:
        malformed = request = None
        try:
            request = decode(pb.SearchRequest, data)
        except RequestError as exc:
            malformed = exc  # raised inside the span, so that it is counted like any refusal
        # The client's span for this search is the parent, when the request carries it.
        parent = search_context(request.trace_context) if request is not None else None
        with self._telemetry.search(method, parent) as record:
            if malformed is not None:
                raise malformed
            response = await self._search(request, context, session)
            if record.span.is_recording():  # the span's attributes need the result
                record.result = wire.search_result(pb.SearchResponse.FromString(response))
            return response

    def _try_request(self, request: bytes, context, session) -> bytes | bool | None:
        """The inline search of ``_search`` (below) with the request decoded and checked in the
        engine (``Datastore.try_search_request``): the answer's bytes, ``False`` when the slice
        ran out, ``None`` when not tried (a search in flight, no slice, the deadline passed) or
        for a request that the engine's checks leave to ``SearchRequestParser``, which refuses
        it with its message. On the server's event loop, decoding and checking a request in
        Python cost 10-15 µs a call, against 2 µs in a process that does nothing else
        (docs/BENCHMARKS.md)."""
        if self._engine_limits is None or self._inline_search_s <= 0 or self._in_flight:
            return None
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return None  # refused by _search, after the request's own checks as ever
        try:
            return self._datastore.try_search_request(
                request, self._engine_limits, self._inline_search_s, remaining, session)
        except (KeyError, ValueError, DatastoreError) as exc:  # as in _search
            raise engine_error(exc) from exc

    async def _search(self, request: pb.SearchRequest, context, session, *,
                      inline: bool = True) -> bytes:
        """The serialized ``SearchResponse`` with every back-off level the request asked for:
        the engine encodes it (``as_wire``), which saves building the message from Python
        objects on the event loop. ``inline=False``: its inline slice was spent already."""
        parsed = self._parser.parse(request)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            self._rejected("deadline")
            raise deadline_expired()
        if self._in_flight >= self._max_in_flight:
            self._rejected("overloaded")
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self._in_flight} searches in flight (limit"
                f" {self._max_in_flight}); retry later or on another replica",
            )
        try:
            if inline and self._inline_search_s > 0 and self._in_flight == 0:
                # Waking a worker thread and the loop again costs more than most searches (about
                # 60-110 us on a small host, docs/BENCHMARKS.md): with no other search in flight,
                # try the search here for a short, bounded slice first: one slice per back-off
                # level asked for, since each level is a search of its own. A search given up on
                # the loop goes to a worker, which resumes it after the levels it finished when
                # the call has a session (a stream), else searches it again from the start.
                inline_s = self.inline_slice_s(parsed.levels, remaining)
                response = self._datastore.try_search(
                    parsed.context, parsed.params, parsed.shards, inline_s,
                    levels=parsed.levels, as_wire=True, session=session)
                if response is not None:
                    return response
            self._in_flight += 1
            try:
                return await self._searches.search(
                    parsed.context, parsed.params, parsed.shards, remaining,
                    levels=parsed.levels, session=session)
            finally:
                self._in_flight -= 1
        except TimeoutError:  # still queued for a worker when the deadline passed
            self._rejected("deadline")
            raise deadline_expired() from None
        except (KeyError, ValueError, DatastoreError) as exc:  # DatastoreError: shard out of service
            raise engine_error(exc) from exc

    def inline_slice_s(self, levels: int, remaining: float | None) -> float:
        """How long a search of ``levels`` back-off levels may run on the event loop before
        it is handed to a worker: ``inline_search_s`` per level, never past the deadline."""
        slice_s = self._inline_search_s * levels
        return slice_s if remaining is None else min(slice_s, remaining)

    def _rejected(self, reason: str) -> None:
        if self._telemetry is not None:
            self._telemetry.rejected(reason)

    @property
    def in_flight(self) -> int:
        """Searches admitted to the executor and not answered yet."""
        return self._in_flight


def add_to_server(servicer: RetrieverServicer, server: grpc.aio.Server) -> None:
    """The generated ``add_RetrieverServicer_to_server``, except that requests reach the handlers
    as bytes (they decode them: a malformed message is INVALID_ARGUMENT there, where a failing
    deserializer would be UNKNOWN) and search responses reach gRPC already serialized
    (``RetrieverServicer`` returns the engine's bytes); Info's response is an ordinary message."""
    as_bytes = None  # grpc passes bytes through when a method has no (de)serializer
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info,
            request_deserializer=as_bytes,
            response_serializer=pb.InfoResponse.SerializeToString,
        ),
        "Search": grpc.unary_unary_rpc_method_handler(
            servicer.Search,
            request_deserializer=as_bytes,
            response_serializer=as_bytes,
        ),
        "SearchStream": grpc.stream_stream_rpc_method_handler(
            servicer.SearchStream,
            request_deserializer=as_bytes,
            response_serializer=as_bytes,
        ),
    }
    assert set(handlers) == set(SERVICE.methods_by_name), "a Retriever method has no handler"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
