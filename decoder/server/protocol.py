"""The OpenAI request subset the server honours, and its response and error bodies.

Requests accept OpenAI's fields that the decoder can honour (``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``, ``user``), vLLM's
``top_k``, and one extension: ``drafting`` (default true; false decodes that request with plain
steps, for comparisons and for requests where drafting does not pay). Fields that only have a
meaning we cannot give (``n`` above 1, ``logprobs``, ``echo``, penalties, ``logit_bias``, tools,
response formats...) are refused with 400 when set to anything but their no-op value; unknown
fields are refused too, so that nothing a client asks for is silently ignored.

Sampling settings a request leaves out come from the model's own generation config, as with
``model.generate`` (OpenAI's own defaults, temperature 1 for instance, are those of OpenAI's
models).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, description="vLLM's extension; 0 or -1: off.")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    drafting: bool = Field(default=True, description="Extension: false decodes with plain steps.")
    # Accepted at their no-op values only (clients send them with their defaults).
    n: Literal[1] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias")
    @classmethod
    def _only_no_op(cls, value):
        if value:
            raise ValueError("not supported by this server (only its no-op value, 0 or empty)")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def generation(self) -> dict[str, Any]:
        """``GenerationConfig`` keyword arguments for what the request set (the rest: the
        model's own)."""
        settings: dict[str, Any] = {}
        if self.temperature is not None:
            settings["do_sample"] = self.temperature > 0
            if self.temperature > 0:
                settings["temperature"] = self.temperature
        if self.top_p is not None:
            settings["top_p"] = self.top_p
        if self.top_k is not None:
            settings["top_k"] = max(self.top_k, 0)
        if self.seed is not None:
            settings["seed"] = self.seed
        return settings

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt, text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: Literal[False] | None = None
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("one prompt per request (send several requests instead)")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None
    top_logprobs: None = None

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# The decoder's finish reasons in OpenAI's words (an EOS token and a stop string both "stop").
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def error_body(message: str, status: int, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error object."""
    kinds = {400: "invalid_request_error", 404: "invalid_request_error",
             429: "rate_limit_exceeded", 503: "service_unavailable"}  # fmt: skip
    kind = kinds.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
