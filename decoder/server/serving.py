"""The HTTP layer: FastAPI handlers, server-sent events, and every error's status in one place.

A handler checks what it can before any work (serving at all, capacity, the model's name, the
request's fields), turns the request into a ``SequenceRequest`` and hands it to the engine. The
answer is assembled from the engine's updates: as one JSON body, or as server-sent events the
way OpenAI sends them (one ``data:`` JSON chunk per step that produced text, the finish reason in
the last chunk, an optional usage chunk, then ``data: [DONE]``). Once a stream has started, an
error is a final ``data: {"error": ...}`` event, not a status code.

A client that goes away aborts its request: a stream's generator is cancelled by Starlette when
the client disconnects, and a non-streaming handler races its answer against the disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoder.errors import DecoderError
from decoder.generator import IncrementalDetokenizer
from decoder.server import protocol
from decoder.batch import SequenceRequest
from decoder.server.engine import (
    AsyncEngine,
    EngineFailed,
    Overloaded,
    RequestRefused,
    RequestStream,
    Unavailable,
)
from decoder.server.metrics import ServerMetrics
from decoder.server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)

# OpenAI's default for /v1/completions; chat requests default to the rest of the context.
DEFAULT_COMPLETION_TOKENS = 16
# For a model whose context length its config does not say.
DEFAULT_CHAT_TOKENS = 256


@dataclass(frozen=True)
class ModelInfo:
    """What the HTTP layer needs of the model: its served name, the tokenizer (chat template,
    decoding), how a text prompt becomes ids (the generator's own ``encode``), and its context
    length (prompt plus output; None when the config does not say)."""

    name: str
    tokenizer: Any
    encode: Callable[[str], list[int]]
    max_model_len: int | None


class ApiError(Exception):
    """An error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class ServerState:
    """Loading, ready, draining or failed; the engine and the model once loaded.

    ``loader`` runs on a thread when the app starts (loading a model takes a while, and /health
    answers meanwhile) and returns the decoder and the ``ModelInfo``. ``on_failure`` is called
    (on the event loop) when loading fails or the engine dies, with the exception.
    """

    def __init__(
        self,
        loader: Callable[[], tuple[Any, ModelInfo]],
        metrics: ServerMetrics | None = None,
        max_in_flight: int = 64,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.loader = loader
        self.metrics = metrics or ServerMetrics()
        self.max_in_flight = max_in_flight
        self.on_failure = on_failure
        self.status = "loading"
        self.failure: BaseException | None = None
        self.engine: AsyncEngine | None = None
        self.model: ModelInfo | None = None
        self.created = protocol.now()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                decoder, model = self.loader()
            except BaseException as exc:  # noqa: BLE001 - reported by on_failure
                loop.call_soon_threadsafe(self._failed, exc)
                return
            loop.call_soon_threadsafe(self._ready, decoder, model)

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    def _ready(self, decoder: Any, model: ModelInfo) -> None:
        if self.status != "loading":
            return  # draining began while the model loaded
        self.engine = AsyncEngine(decoder, self.metrics, self.max_in_flight)
        self.engine.start()
        self.model = model
        self.status = "ready"
        log.info("ready: serving %s (at most %d requests in flight)", model.name,
                 self.max_in_flight)

    def _failed(self, exc: BaseException) -> None:
        self.status, self.failure = "failed", exc
        if self.on_failure is not None:
            self.on_failure(exc)

    def drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        if self.status in ("loading", "ready"):
            self.status = "draining"

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop(timeout_s=30)

    def serving(self) -> tuple[AsyncEngine, ModelInfo]:
        """The engine and model, or ``Unavailable`` with the reason."""
        if self.engine is not None and self.engine.failure is not None and self.status == "ready":
            self._failed(self.engine.failure)
        if self.status != "ready":
            reasons = {
                "loading": "the model is still loading; retry shortly",
                "draining": "the server is shutting down; send the request to another replica",
                "failed": f"the server failed ({self.failure!r}) and must be restarted",
            }
            raise Unavailable(reasons[self.status])
        assert self.engine is not None and self.model is not None
        return self.engine, self.model


class TextAssembler:
    """The text of one request's tokens, as they arrive, without its stop string.

    OpenAI's answers end before the stop string; the decoder ends the output with it. While stop
    strings are set, the last ``longest - 1`` characters are held back (they could be the start
    of one), and at the end the text is cut at the first stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""
        self._sent = 0

    def add(self, tokens: Sequence[int]) -> str:
        self.text += self._detokenizer.add(tokens)
        end = min(self._stop_at(), len(self.text) - self._hold)
        return self._take(end)

    def finish(self) -> str:
        self.text += self._detokenizer.flush()
        self.text = self.text[: self._stop_at()]
        return self._take(len(self.text))

    def _stop_at(self) -> int:
        found = [i for i in (self.text.find(s) for s in self._stop) if i >= 0]
        return min(found, default=len(self.text))

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        delta, self._sent = self.text[self._sent : end], end
        return delta


# -- turning requests into sequences ---------------------------------------------------------


def context_length_error(limit: int, prompt_tokens: int, completion_tokens: int) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the prompt, "
        f"{completion_tokens} in the completion). Please reduce the length of the prompt or "
        "the completion (max_tokens).",
        param="max_tokens" if prompt_tokens < limit else "prompt",
        code="context_length_exceeded",
    )


def completion_tokens(model: ModelInfo, prompt_tokens: int, requested: int | None,
                      default: int | None) -> int:  # fmt: skip
    """The request's ``max_new_tokens``: what it asked for, or ``default``, or (None) the rest of
    the context; refused when prompt and completion do not fit the model's context."""
    limit = model.max_model_len
    if requested is None:
        requested = default
    if requested is None:
        requested = limit - prompt_tokens if limit is not None else DEFAULT_CHAT_TOKENS
        if requested < 1:
            raise context_length_error(limit, prompt_tokens, 1)  # type: ignore[arg-type]
    if limit is not None and prompt_tokens + requested > limit:
        raise context_length_error(limit, prompt_tokens, requested)
    return requested


def prompt_ids(model: ModelInfo, prompt: str | list[int]) -> list[int]:
    return model.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]


def chat_prompt_ids(model: ModelInfo, messages: list[dict[str, str]]) -> list[int]:
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"{model.name} has no chat template; use /v1/completions with a "
                            "prompt written in the model's own format", param="messages")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja2's TemplateError: the template refused these messages
        raise ApiError(400, f"the chat template refused the messages: {exc}",
                       param="messages") from exc  # fmt: skip
    if isinstance(ids, dict):  # a BatchEncoding from tokenizers that always return one
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def admit(state: ServerState, body: CompletionRequest | ChatCompletionRequest,
          ) -> tuple[RequestStream, ModelInfo, AsyncEngine]:  # fmt: skip
    """Everything before decoding: serving, capacity, model name, prompt, limits, validation."""
    engine, model = state.serving()
    if engine.in_flight >= engine.max_in_flight:  # before tokenizing: no work for a refusal
        raise Overloaded(f"the server is overloaded ({engine.in_flight} requests in flight); "
                         "retry later")  # fmt: skip
    if body.model != model.name:
        raise ApiError(404, f"The model `{body.model}` does not exist: this server serves "
                            f"`{model.name}` (see /v1/models)", param="model",
                       code="model_not_found")  # fmt: skip
    if isinstance(body, ChatCompletionRequest):
        ids = chat_prompt_ids(model, body.template_messages())
        max_new = completion_tokens(model, len(ids), body.token_limit, None)
        prefix = "chatcmpl"
    else:
        ids = prompt_ids(model, body.prompt)
        max_new = completion_tokens(model, len(ids), body.max_tokens, DEFAULT_COMPLETION_TOKENS)
        prefix = "cmpl"
    request = SequenceRequest(
        request_id=protocol.new_id(prefix), prompt_ids=ids, max_new_tokens=max_new,
        generation=body.generation(), stop=body.stop_strings(), drafting=body.drafting,
    )  # fmt: skip
    try:
        return engine.admit(request), model, engine
    except (ValueError, DecoderError) as exc:  # the decoder's own checks of the request
        raise ApiError(400, str(exc)) from exc


# -- answers ---------------------------------------------------------------------------------


@dataclass
class _Finished:
    text: str
    finish_reason: str
    completion_tokens: int


async def collect(engine: AsyncEngine, stream: RequestStream, text: TextAssembler) -> _Finished:
    tokens = 0
    async for update in engine.updates(stream):
        tokens += len(update.tokens)
        text.add(update.tokens)
        if update.finish_reason is not None:
            text.finish()
            return _Finished(text.text, protocol.FINISH_REASONS[update.finish_reason], tokens)
    raise AssertionError("the engine ended a request without a finish reason")


async def until_disconnected(request: Request, answer: Any) -> Any:
    """``await answer``, unless the client disconnects first: then the answer is cancelled
    (which aborts its sequence) and ``ClientGone`` raised."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(answer)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone()
    return task.result()


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def event_stream(
    engine: AsyncEngine, stream: RequestStream, text: TextAssembler,
    chunk: Callable[[str | None, str | None], dict], include_usage: bool,
    usage_chunk: Callable[[dict], dict], prompt_tokens: int,
) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: ``chunk(delta, finish_reason)`` per step with text, the last one with
    the finish reason, then the usage chunk when asked for, then ``[DONE]``."""
    tokens = 0
    try:
        async for update in engine.updates(stream):
            tokens += len(update.tokens)
            delta = text.add(update.tokens)
            if update.finish_reason is not None:
                delta += text.finish()
                yield sse(chunk(delta, protocol.FINISH_REASONS[update.finish_reason]))
                break
            if delta:
                yield sse(chunk(delta, None))
        if include_usage:
            yield sse(usage_chunk(protocol.usage(prompt_tokens, tokens)))
    except EngineFailed as exc:
        yield sse(protocol.error_body(str(exc), 500))
    except RequestRefused as exc:
        yield sse(protocol.error_body(str(exc), 400))
    yield sse("[DONE]")


def streaming_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


def completion_response(body: CompletionRequest, stream: RequestStream, model: ModelInfo,
                        engine: AsyncEngine, raw: Request) -> Any:  # fmt: skip
    request = stream.request
    created = protocol.now()
    text = TextAssembler(model.tokenizer, request.stop)

    def base() -> dict:
        return {"id": request.request_id, "object": "text_completion", "created": created,
                "model": model.name, "system_fingerprint": None}  # fmt: skip

    if body.stream:
        def chunk(delta, finish_reason):
            choice = {"index": 0, "text": delta or "", "logprobs": None,
                      "finish_reason": finish_reason}  # fmt: skip
            return {**base(), "choices": [choice],
                    **({"usage": None} if body.include_usage else {})}  # fmt: skip

        def usage_chunk(usage):
            return {**base(), "choices": [], "usage": usage}

        return streaming_response(event_stream(engine, stream, text, chunk, body.include_usage,
                                               usage_chunk, len(request.prompt_ids)))

    async def answer():
        done = await until_disconnected(raw, collect(engine, stream, text))
        choice = {"index": 0, "text": done.text, "logprobs": None,
                  "finish_reason": done.finish_reason}  # fmt: skip
        return {**base(), "choices": [choice],
                "usage": protocol.usage(len(request.prompt_ids), done.completion_tokens)}

    return answer()


def chat_response(body: ChatCompletionRequest, stream: RequestStream, model: ModelInfo,
                  engine: AsyncEngine, raw: Request) -> Any:  # fmt: skip
    request = stream.request
    created = protocol.now()
    text = TextAssembler(model.tokenizer, request.stop)

    def base() -> dict:
        return {"id": request.request_id, "object": "chat.completion.chunk", "created": created,
                "model": model.name, "system_fingerprint": None}  # fmt: skip

    if body.stream:
        first = True

        def chunk(delta, finish_reason):
            nonlocal first
            content = {"content": delta} if delta or first else {}
            message = {"role": "assistant", **content} if first else content
            first = False
            choice = {"index": 0, "delta": message, "logprobs": None,
                      "finish_reason": finish_reason}  # fmt: skip
            return {**base(), "choices": [choice],
                    **({"usage": None} if body.include_usage else {})}  # fmt: skip

        def usage_chunk(usage):
            return {**base(), "choices": [], "usage": usage}

        async def events():
            # OpenAI opens a chat stream with the role and empty content, before any token.
            yield sse(chunk("", None))
            async for event in event_stream(engine, stream, text, chunk, body.include_usage,
                                            usage_chunk, len(request.prompt_ids)):  # fmt: skip
                yield event

        return streaming_response(events())

    async def answer():
        done = await until_disconnected(raw, collect(engine, stream, text))
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "logprobs": None, "finish_reason": done.finish_reason}  # fmt: skip
        return {**base(), "object": "chat.completion", "choices": [choice],
                "usage": protocol.usage(len(request.prompt_ids), done.completion_tokens)}

    return answer()


# -- the app ---------------------------------------------------------------------------------


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(protocol.error_body(message, status, param, code), status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, and the field (OpenAI's ``param``)."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = loc[0] if loc else None
    where = ".".join(loc) or "the request body"
    if first.get("type") == "extra_forbidden":
        return f"unsupported field {where!r}: this server does not honour it", field
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('msg')})", None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}", field


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app over ``state`` (started and stopped with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="decoder-server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    app.state.server = state
    metrics = state.metrics

    # Every error's status and body, in one place.
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        metrics.rejected.labels("invalid").inc()
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        metrics.rejected.labels("invalid").inc()
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        metrics.rejected.labels("overloaded").inc()
        return error_response(429, str(exc))

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        metrics.rejected.labels("unavailable").inc()
        return error_response(503, str(exc))

    @app.exception_handler(EngineFailed)
    async def failed(request: Request, exc: EngineFailed):
        return error_response(500, str(exc))

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused):
        return error_response(400, str(exc))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the client has gone

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        stream, model, engine = admit(state, body)
        response = completion_response(body, stream, model, engine, raw)
        return response if isinstance(response, StreamingResponse) else await response

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        stream, model, engine = admit(state, body)
        response = chat_response(body, stream, model, engine, raw)
        return response if isinstance(response, StreamingResponse) else await response

    def model_card(model: ModelInfo) -> dict:
        return {"id": model.name, "object": "model", "created": state.created,
                "owned_by": "rest-decoding", "max_model_len": model.max_model_len}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        _, model = state.serving()
        return {"object": "list", "data": [model_card(model)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        _, model = state.serving()
        if name != model.name:
            raise ApiError(404, f"The model `{name}` does not exist", param="model",
                           code="model_not_found")  # fmt: skip
        return model_card(model)

    @app.get("/health")
    async def health():
        """200 while serving; 503 while loading, draining or failed. Reads state only."""
        engine = state.engine
        if engine is not None and engine.failure is not None and state.status == "ready":
            state._failed(engine.failure)
        body: dict[str, Any] = {"status": state.status}
        if engine is not None:
            body |= {"in_flight": engine.in_flight, "max_in_flight": engine.max_in_flight}
        if state.failure is not None:
            body["error"] = repr(state.failure)
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/metrics")
    async def prometheus(request: Request):
        data, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(data, media_type=content_type)

    return app
