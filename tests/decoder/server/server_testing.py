"""Helpers for the server tests: a fake decoder with ``BatchDecoder``'s interface, the app on a
uvicorn thread in this process, and (``decoder.server.process``) ``decoder-server`` as a real
subprocess.

Every server listens on 127.0.0.1 with a port the OS picks.
"""

from __future__ import annotations

import copy
import functools
import re
import threading
import time
from collections.abc import Callable

import openai

from decoder.server.cli import bind
from decoder.batch import SequenceRequest, SequenceUpdate, StepStats
from decoder.server.process import ServerProcess  # noqa: F401  (the tests' server process)
from decoder.server.serving import ModelInfo, ServerState, build_app
from tests.decoder.helpers import EOS, VOCAB, make_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"


def tokenizer_with_template(template: str | None = CHAT_TEMPLATE):
    tokenizer = copy.deepcopy(make_tokenizer())  # a copy: the helper's tokenizer is shared
    tokenizer.chat_template = template
    return tokenizer


def fake_continuation(prompt: list[int], n: int) -> list[int]:
    """The fake model's output: counting up from the prompt's last word, skipping ids 0-2."""
    out, last = [], prompt[-1]
    for _ in range(n):
        last = 3 + (last - 3 + 1) % (VOCAB - 3)
        out.append(last)
    return out


class FakeDecoder:
    """``BatchDecoder``'s interface without a model: each sequence continues with
    ``fake_continuation``, two tokens per step while drafting (one draft token accepted out of
    three verified), one without. Stops as the real decoder does (``FakeStops``).

    ``gate``: steps wait until it is set (so that requests stay in flight). ``step_s``: each
    step sleeps that long. ``fail_at_step``: that step raises. ``eos_after``: the sequence emits
    EOS after that many tokens.
    """

    def __init__(self, tokenizer, max_batch: int = 4, step_s: float = 0.0,
                 eos_after: int | None = None) -> None:  # fmt: skip
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.step_s = step_s
        self.eos_after = eos_after
        self.gate = threading.Event()
        self.gate.set()
        self.fail_at_step: int | None = None
        self.steps = 0
        self.added: list[SequenceRequest] = []
        self.aborted: list[str] = []
        self.validated = 0
        self._waiting: list[SequenceRequest] = []
        self._running: dict[str, tuple[SequenceRequest, FakeStops, list[int]]] = {}
        self._abort: set[str] = set()
        self.lock = threading.Lock()  # guards what tests read from another thread

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._abort)

    def running_ids(self) -> set[str]:
        with self.lock:
            return set(self._running)

    def validate(self, request: SequenceRequest) -> None:
        self.validated += 1
        if any(not 0 <= t < VOCAB for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {VOCAB})")
        if request.max_new_tokens < 1 or any(not s for s in request.stop):
            raise ValueError("bad request")

    def add(self, request: SequenceRequest) -> None:
        if request.prompt_ids == [4, 4, 4]:
            raise ValueError("refused when added")
        self.added.append(request)
        self._waiting.append(request)

    def abort(self, request_id: str) -> None:
        self._abort.add(request_id)

    def step(self) -> tuple[list[SequenceUpdate], StepStats]:
        assert self.gate.wait(30), "test gate never opened"
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("device lost")
        if self.step_s:
            time.sleep(self.step_s)
        updates = []
        with self.lock:
            for request_id in self._abort:
                self.aborted.append(request_id)
                self._running.pop(request_id, None)
                self._waiting = [r for r in self._waiting if r.request_id != request_id]
                updates.append(SequenceUpdate(request_id, [], "abort", None))
            self._abort.clear()
            while self._waiting and len(self._running) < self.max_batch:
                r = self._waiting.pop(0)
                checker = FakeStops(r.max_new_tokens, r.stop, self.tokenizer)
                self._running[r.request_id] = (r, checker, list(r.prompt_ids))
            batch = len(self._running)
            draft = accepted = emitted = 0
            for request_id, (r, checker, context) in list(self._running.items()):
                n = 2 if r.drafting else 1
                proposed = fake_continuation(context, n)
                if self.eos_after is not None:
                    at = self.eos_after - len(checker.tokens)
                    if 0 <= at < n:
                        proposed = proposed[:at] + [EOS]
                tokens = checker.extend(proposed)
                context.extend(tokens)
                if r.drafting:
                    draft += 3
                    accepted += len(tokens) - 1
                emitted += len(tokens)
                done = checker.finish_reason
                updates.append(SequenceUpdate(request_id, tokens, done, None))
                if done is not None:
                    del self._running[request_id]
        return updates, StepStats(batch, draft, accepted, emitted, 0.001 * batch, 0, 0.002)


class FakeStops:
    """``StopChecker``'s contract for the fake: EOS and stop strings end the output (kept in
    it), else ``max_new_tokens``; strings are matched on the decoded output."""

    def __init__(self, max_new_tokens: int, stop: tuple, tokenizer) -> None:
        self.max_new_tokens, self.stop, self.tokenizer = max_new_tokens, stop, tokenizer
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def extend(self, emitted: list[int]) -> list[int]:
        taken = []
        for token in emitted:
            if self.finish_reason is not None:
                break
            self.tokens.append(token)
            taken.append(token)
            if token == EOS:
                self.finish_reason = "eos"
            elif any(s in self.tokenizer.decode(self.tokens) for s in self.stop):
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        return taken


class InProcessServer:
    """The app over ``state`` on a uvicorn thread of this process."""

    def __init__(self, state: ServerState) -> None:
        import uvicorn

        self.state = state
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(state), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)  # fmt: skip
        self.thread.start()
        assert wait_until(lambda: self.server.started, 20), "the server did not start"

    def client(self) -> openai.OpenAI:
        return openai_client(self.url)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def fake_state(decoder: FakeDecoder, *, name: str = "fake", max_model_len: int | None = 64,
               max_in_flight: int = 64, loaded: threading.Event | None = None,
               metrics=None) -> ServerState:  # fmt: skip
    """A ``ServerState`` whose loader returns ``decoder`` (after ``loaded`` is set, if given)."""
    tokenizer = decoder.tokenizer

    def loader():
        if loaded is not None:
            assert loaded.wait(30)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
        return decoder, ModelInfo(name, tokenizer, encode, max_model_len)

    return ServerState(loader, metrics, max_in_flight=max_in_flight)


@functools.lru_cache(maxsize=None)
def openai_client(url: str) -> openai.OpenAI:
    """The official client for a server at ``url`` (made once: it takes a while), no retries."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               interval: float = 0.01) -> bool:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (``labels`` as written, e.g. 'reason="x"')."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match is not None, f"no sample {name}{{{labels}}}"
    return float(match.group(1))
