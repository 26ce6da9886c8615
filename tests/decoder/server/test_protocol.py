"""decoder/server/protocol.py and the text assembly of serving.py: what a request means."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from decoder.server.protocol import ChatCompletionRequest, CompletionRequest, error_body
from decoder.server.serving import TextAssembler
from tests.decoder.helpers import make_tokenizer


def test_generation_settings_are_only_what_the_request_set() -> None:
    assert CompletionRequest(model="m", prompt="x").generation() == {}
    assert CompletionRequest(model="m", prompt="x", temperature=0).generation() == {
        "do_sample": False}
    assert CompletionRequest(model="m", prompt="x", temperature=0.5, top_p=0.9, top_k=-1,
                             seed=3).generation() == {
        "do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 0, "seed": 3}  # fmt: skip


def test_no_op_values_of_unsupported_fields_are_accepted() -> None:
    request = CompletionRequest(model="m", prompt=["one prompt"], n=1, presence_penalty=0.0,
                                frequency_penalty=0, logit_bias={}, echo=False, best_of=1,
                                user="u")  # fmt: skip
    assert request.prompt == "one prompt"
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 max_tokens=3, max_completion_tokens=5, logprobs=False)
    assert chat.token_limit == 5


@pytest.mark.parametrize("field", [{"n": 2}, {"presence_penalty": 0.1}, {"logit_bias": {"5": 1}},
                                   {"echo": True}, {"suffix": "x"}, {"best_of": 2},
                                   {"logprobs": 1}, {"tools": []}])  # fmt: skip
def test_fields_with_a_meaning_the_server_cannot_give_are_refused(field) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", **field)


def test_error_bodies_are_openais() -> None:
    assert error_body("no", 404, "model", "model_not_found") == {"error": {
        "message": "no", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found"}}  # fmt: skip
    assert error_body("busy", 429)["error"]["type"] == "rate_limit_exceeded"
    assert error_body("boom", 500)["error"]["type"] == "server_error"


def test_text_holds_back_what_could_start_a_stop_string_and_ends_before_it() -> None:
    tokenizer = make_tokenizer()
    text = TextAssembler(tokenizer, stop=(" w11",))
    deltas = [text.add([10])]  # "w10": held back, it could be followed by " w11"
    assert deltas == [""]
    deltas.append(text.add([11]))  # "w10 w11": the stop string; the answer ends before it
    deltas.append(text.finish())
    assert "".join(deltas) == "w10" == text.text


def test_text_without_stop_strings_streams_everything() -> None:
    text = TextAssembler(make_tokenizer())
    assert [text.add([10]), text.add([11, 12]), text.finish()] == ["w10", " w11 w12", ""]


def test_text_that_only_resembles_a_stop_string_is_released_at_the_end() -> None:
    text = TextAssembler(make_tokenizer(), stop=("w90 w91",))
    pieces = [text.add([10]), text.add([90]), text.finish()]
    assert "".join(pieces) == "w10 w90"
