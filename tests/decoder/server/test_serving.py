"""decoder/server/serving.py and engine.py over a fake decoder, through the official openai
client: the HTTP layer and the async engine without a model."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from decoder.server.metrics import ServerMetrics
from tests.decoder.server.server_testing import (
    FakeDecoder,
    InProcessServer,
    fake_continuation,
    fake_state,
    metric_value,
    tokenizer_with_template,
    wait_until,
)

PROMPT = "w5 w7 w9"


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture
def decoder():
    """A fresh decoder, for tests that start their own server."""
    return FakeDecoder(tokenizer_with_template())


@pytest.fixture(scope="module")
def shared_decoder():
    return FakeDecoder(tokenizer_with_template())


@pytest.fixture(scope="module")
def server(shared_decoder):
    """One server for the tests that leave it as they found it."""
    server = InProcessServer(fake_state(shared_decoder))
    assert wait_until(lambda: server.state.status == "ready")
    yield server
    server.close()


def test_completion_and_its_usage(server, shared_decoder) -> None:
    out = server.client().completions.create(model="fake", prompt=PROMPT, max_tokens=7)
    assert out.object == "text_completion" and out.model == "fake"
    assert out.choices[0].text == words(fake_continuation([9], 7))
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (3, 7, 10)
    request = shared_decoder.added[-1]
    assert request.prompt_ids == [5, 7, 9] and request.max_new_tokens == 7
    assert request.request_id == out.id and request.drafting


def test_token_id_prompts_and_the_default_of_16_tokens(server, shared_decoder) -> None:
    out = server.client().completions.create(model="fake", prompt=[5, 7, 9])
    assert out.choices[0].text == words(fake_continuation([9], 16))
    assert shared_decoder.added[-1].max_new_tokens == 16


def test_streamed_completion_is_the_same_text_in_chunks(server) -> None:
    chunks = list(server.client().completions.create(
        model="fake", prompt=PROMPT, max_tokens=7, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == words(fake_continuation([9], 7))
    assert len(texts) >= 4  # one chunk per step (two tokens per step)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert len({c.id for c in chunks}) == 1


def test_server_sent_events_are_framed_as_openai_frames_them(server) -> None:
    body = {"model": "fake", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)


def test_chat_uses_the_chat_template(server, shared_decoder) -> None:
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w5 w6"}]
    out = server.client().chat.completions.create(model="fake", messages=messages, max_tokens=5)
    tokenizer = tokenizer_with_template()
    want_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert shared_decoder.added[-1].prompt_ids == list(want_prompt)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == words(fake_continuation(want_prompt, 5))
    assert out.usage.prompt_tokens == len(want_prompt)


def test_streamed_chat_opens_with_the_role_and_ends_with_the_finish_reason(server) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}]
    chunks = list(server.client().chat.completions.create(
        model="fake", messages=messages, max_completion_tokens=5, stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    prompt = tokenizer_with_template().apply_chat_template(
        [{"role": "user", "content": "w5 w6"}], add_generation_prompt=True)  # fmt: skip
    assert text == words(fake_continuation(prompt, 5))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_default_length_is_the_rest_of_the_context(server, shared_decoder) -> None:
    server.client().chat.completions.create(model="fake", messages=[{"role": "user",
                                                                     "content": "w5"}])
    request = shared_decoder.added[-1]
    assert len(request.prompt_ids) + request.max_new_tokens == 64  # max_model_len


def test_sampling_settings_stop_and_the_drafting_switch_reach_the_decoder(server, shared_decoder) -> None:
    server.client().completions.create(
        model="fake", prompt=PROMPT, max_tokens=4, temperature=0.7, top_p=0.9, seed=11,
        stop=["w99"], extra_body={"top_k": 20, "drafting": False})  # fmt: skip
    request = shared_decoder.added[-1]
    assert request.generation == {"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                  "top_k": 20, "seed": 11}  # fmt: skip
    assert request.stop == ("w99",) and request.drafting is False
    server.client().completions.create(model="fake", prompt=PROMPT, max_tokens=4, temperature=0)
    assert shared_decoder.added[-1].generation == {"do_sample": False}
    server.client().completions.create(model="fake", prompt=PROMPT, max_tokens=4)
    assert shared_decoder.added[-1].generation == {}  # the model's own generation config


def test_stop_strings_end_the_text_before_them(server) -> None:
    # The continuation of w9 is w10 w11 w12 ...; "w12" is held back, then cut.
    client = server.client()
    out = client.completions.create(model="fake", prompt=PROMPT, max_tokens=20, stop=["w12"])
    assert out.choices[0].text == "w10 w11 " and out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="fake", prompt=PROMPT, max_tokens=20,
                                            stop=["w12", "zzz"], stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == "w10 w11 "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_eos_is_a_stop_and_is_not_in_the_text(decoder) -> None:
    decoder.eos_after = 3
    server = InProcessServer(fake_state(decoder))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        out = server.client().completions.create(model="fake", prompt=PROMPT, max_tokens=20)
    finally:
        server.close()
    assert out.choices[0].text == "w10 w11 w12" and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == 4


def test_models_and_health(server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["fake"]
    assert server.client().models.retrieve("fake").id == "fake"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "other", "prompt": "w5"}, 404, "model"),
    ({"model": "fake", "prompt": "w5", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "w5 " * 60, "max_tokens": 10}, 400, "max_tokens"),
    ({"model": "fake", "prompt": "w5 " * 70, "max_tokens": 10}, 400, "prompt"),
    ({"model": "fake", "prompt": "w5", "n": 2}, 400, "n"),
    ({"model": "fake", "prompt": "w5", "logprobs": 2}, 400, "logprobs"),
    ({"model": "fake", "prompt": "w5", "echo": True}, 400, "echo"),
    ({"model": "fake", "prompt": "w5", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"model": "fake", "prompt": "w5", "temperature": -1}, 400, "temperature"),
    ({"model": "fake", "prompt": "w5", "top_p": 0}, 400, "top_p"),
    ({"model": "fake", "prompt": "w5", "stop": [""]}, 400, "stop"),
    ({"model": "fake", "prompt": "w5", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "fake", "prompt": ["w5", "w6"]}, 400, "prompt"),
    ({"model": "fake", "prompt": ""}, 400, "prompt"),
    ({"model": "fake", "prompt": [5, 500]}, 400, None),  # the decoder's validate: id out of range
    ({"model": "fake"}, 400, "prompt"),
    ({"model": "fake", "prompt": "w5", "stream_options": {"include_usage": True}}, 400, None),
])  # fmt: skip
def test_bad_completion_requests_get_4xx_with_an_openai_error_body(server, shared_decoder, body, status,
                                                                   param) -> None:
    added = len(shared_decoder.added)
    response = httpx.post(f"{server.url}/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert len(shared_decoder.added) == added  # refused before any work
    if "prompt" in body and body["prompt"] == "w5 " * 70:
        assert error["code"] == "context_length_exceeded"
        assert "maximum context length is 64 tokens" in error["message"]


def test_the_openai_client_raises_its_own_errors(server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="w5")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="fake", prompt="w5", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="fake", messages=[{"role": "user",
                                                                "content": "w5 " * 70}])


@pytest.mark.parametrize("body, param", [
    ({"model": "fake", "messages": []}, "messages"),
    ({"model": "fake", "messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"model": "fake", "messages": [{"role": "user", "content": "w5"}], "tools": []}, "tools"),
    ({"model": "fake", "messages": [{"role": "user", "content": "w5"}], "logprobs": True},
     "logprobs"),
    ({"model": "fake", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages"),
])  # fmt: skip
def test_bad_chat_requests(server, body, param) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_not_json_and_unknown_routes_get_openai_error_bodies(server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", content=b"{nope",
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.get(f"{server.url}/v1/embeddings")
    assert response.status_code == 404 and response.json()["error"]["message"]


def test_a_model_without_chat_template_refuses_chat(decoder) -> None:
    plain = FakeDecoder(tokenizer_with_template(None))
    server = InProcessServer(fake_state(plain))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        response = httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "w5"}]})  # fmt: skip
    finally:
        server.close()
    assert response.status_code == 400 and "chat template" in response.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(decoder) -> None:
    decoder.step_s = 0.005
    server = InProcessServer(fake_state(decoder))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        client = server.client()
        results = {}

        def full(prompt):
            chunks = client.completions.create(model="fake", prompt=prompt, max_tokens=40,
                                               stream=True, extra_body={"drafting": False})
            results[prompt] = "".join(c.choices[0].text for c in chunks)

        others = [threading.Thread(target=full, args=(p,)) for p in ("w20", "w30")]
        for t in others:
            t.start()
        gone = client.completions.create(model="fake", prompt="w5", max_tokens=40, stream=True,
                                         extra_body={"drafting": False})  # fmt: skip
        first = next(iter(gone))
        gone_id = first.id
        assert first.choices[0].text
        gone.close()  # the client goes away after one chunk
        assert wait_until(lambda: gone_id in decoder.aborted, 10)
        assert gone_id not in decoder.running_ids()
        for t in others:
            t.join(30)
        assert results == {p: words(fake_continuation([int(p[1:])], 40)) for p in ("w20", "w30")}
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "rest_decoder_requests_total", 'finish_reason="abort"') == 1
        assert metric_value(metrics, "rest_decoder_requests_total", 'finish_reason="length"') == 2
    finally:
        server.close()


def test_a_non_streaming_client_that_goes_away_is_aborted(decoder) -> None:
    decoder.step_s = 0.01
    server = InProcessServer(fake_state(decoder))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", timeout=0.3,
                       json={"model": "fake", "prompt": "w5", "max_tokens": 60})  # fmt: skip
        assert wait_until(lambda: len(decoder.aborted) == 1, 10)
        assert not decoder.running_ids()
    finally:
        server.close()


def test_overload_is_refused_with_429_before_any_work(decoder) -> None:
    decoder.gate.clear()  # steps wait: admitted requests stay in flight
    server = InProcessServer(fake_state(decoder, max_in_flight=2))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        client = server.client()
        streams = [client.completions.create(model="fake", prompt="w5", max_tokens=3,
                                             stream=True) for _ in range(2)]  # fmt: skip
        validated = decoder.validated
        with pytest.raises(openai.RateLimitError, match="overloaded"):
            client.completions.create(model="fake", prompt="w5", max_tokens=3)
        assert decoder.validated == validated  # refused before validation
        decoder.gate.set()
        assert ["".join(c.choices[0].text for c in s) for s in streams] == ["w6 w7 w8"] * 2
        out = client.completions.create(model="fake", prompt="w5", max_tokens=3)
        assert out.choices[0].text == "w6 w7 w8"  # a place is free again
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "rest_decoder_requests_rejected_total",
                            'reason="overloaded"') == 1  # fmt: skip
    finally:
        server.close()


def test_health_and_requests_get_503_while_loading_and_draining(decoder) -> None:
    loaded = threading.Event()
    server = InProcessServer(fake_state(decoder, loaded=loaded))
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        response = httpx.post(f"{server.url}/v1/completions", json={"model": "fake", "prompt": "w5"})
        assert response.status_code == 503 and "loading" in response.json()["error"]["message"]
        loaded.set()
        assert wait_until(lambda: httpx.get(f"{server.url}/health").status_code == 200)
        decoder.step_s = 0.005
        stream = server.client().completions.create(model="fake", prompt="w5", max_tokens=30,
                                                    stream=True)  # fmt: skip
        server.state.drain()
        assert httpx.get(f"{server.url}/health").json()["status"] == "draining"
        with pytest.raises(openai.APIStatusError) as refused:
            server.client().completions.create(model="fake", prompt="w5")
        assert refused.value.status_code == 503
        assert "".join(c.choices[0].text for c in stream) == words(fake_continuation([5], 30))
    finally:
        server.close()


def test_a_failing_step_ends_every_request_with_an_error_and_health_says_so(decoder) -> None:
    decoder.fail_at_step = 3
    server = InProcessServer(fake_state(decoder))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        client = server.client()
        stream = client.completions.create(model="fake", prompt="w5", max_tokens=30, stream=True)
        with pytest.raises(openai.APIError, match="device lost"):
            list(stream)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="fake", prompt="w5")
        assert refused.value.status_code == 503
        metrics = httpx.get(f"{server.url}/metrics").text
        assert metric_value(metrics, "rest_decoder_requests_total", 'finish_reason="error"') == 1
    finally:
        server.close()


def test_metrics_count_tokens_steps_drafts_and_batches(decoder) -> None:
    metrics = ServerMetrics()
    server = InProcessServer(fake_state(decoder, metrics=metrics))
    try:
        assert wait_until(lambda: server.state.status == "ready")
        client = server.client()
        client.completions.create(model="fake", prompt="w5 w6", max_tokens=6)  # 3 steps
        client.completions.create(model="fake", prompt="w5", max_tokens=3,
                                  extra_body={"drafting": False})  # 3 steps, no drafts
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        server.close()
    value = lambda name, labels="": metric_value(text, f"rest_decoder_{name}", labels)  # noqa: E731
    assert value("prompt_tokens_total") == 3
    assert value("generation_tokens_total") == 9
    assert value("steps_total") == 6 and value("sequence_steps_total") == 6
    assert value("spec_decode_num_draft_tokens_total") == 9  # 3 per drafting sequence step
    assert value("spec_decode_num_accepted_tokens_total") == 3
    assert value("requests_total", 'finish_reason="length"') == 2
    assert value("batch_size_count") == 6 and value("batch_size_sum") == 6
    assert value("step_retrieval_seconds_count") == 6
    assert value("time_to_first_token_seconds_count") == 2
    assert value("e2e_request_latency_seconds_count") == 2
    assert value("requests_running") == 0 and value("requests_waiting") == 0
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    helps = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    assert families == helps and all(f.startswith("rest_decoder_") for f in families)
    assert "request_id" not in text and "cmpl-" not in text


def test_metrics_speak_openmetrics_with_units_when_asked(server) -> None:
    response = httpx.get(f"{server.url}/metrics",
                         headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert "# UNIT rest_decoder_step_retrieval_seconds seconds" in response.text
    assert "# UNIT rest_decoder_prompt_tokens tokens" in response.text


def test_a_request_the_decoder_refuses_when_added_fails_alone(server) -> None:
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="refused when added"):
        client.completions.create(model="fake", prompt="w4 w4 w4")
    with pytest.raises(openai.APIError, match="refused when added"):
        list(client.completions.create(model="fake", prompt="w4 w4 w4", stream=True))
    assert client.completions.create(model="fake", prompt="w5", max_tokens=2).choices[0].text
