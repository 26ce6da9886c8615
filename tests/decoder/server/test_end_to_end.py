"""``decoder-server`` as a real process on a tiny model saved to a directory, through the
official openai client: outputs equal Hugging Face greedy and ``rest generate``, concurrency,
disconnects, bad requests, SIGTERM."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from click.testing import CliRunner

from decoder.cli import generate
from tests.decoder.helpers import VOCAB, hf_greedy, make_model
from tests.decoder.server.server_testing import (
    ServerProcess,
    metric_value,
    openai_client,
    tokenizer_with_template,
    wait_until,
)

PROMPT = "w5 w7 w9 w11"
# One intra-op thread for the server's tiny model: on a shared 2-core machine a second one only
# waits for the first.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
NEW_TOKENS = 24
MAX_POSITIONS = 256  # the tiny model's max_position_embeddings


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def word_prompts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [words(rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 12))) for _ in range(n)]


def reference(prompt: str, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = tokenizer_with_template()(prompt)["input_ids"]
    return hf_greedy(make_model("llama"), ids, max_new_tokens)


def text_of(tokens) -> str:
    return tokenizer_with_template().decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model("llama").save_pretrained(path)
    tokenizer_with_template().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def datastore_dir(tmp_path_factory):
    """The model's own greedy continuations of every test prompt: drafts that are accepted."""
    from rest.datastore import build_datastore
    from rest.tokenizer import tokenizer_fingerprint, tokenizer_name

    tokenizer = tokenizer_with_template()
    documents = []
    for prompt in [PROMPT, *word_prompts(10)]:
        ids = tokenizer(prompt)["input_ids"]
        documents.append(ids + hf_greedy(make_model("llama"), ids, 64))
    path = tmp_path_factory.mktemp("store") / "ds"
    build_datastore(path, documents, vocab_size=len(tokenizer),
                    tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def server(model_dir, datastore_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "server.log"
    server = ServerProcess("--model", str(model_dir), "--datastore", str(datastore_dir),
                           "--served-model-name", "tiny", "--max-batch", "8", "--budget", "8",
                           log_path=log, env=ONE_THREAD)  # fmt: skip
    yield server
    server.terminate()
    assert server.wait() == 0
    server.kill()


def metrics(server) -> str:
    return httpx.get(f"{server.url}/metrics").text


def test_health_says_ready(server) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ready", "in_flight": 0, "max_in_flight": 64}


def test_greedy_equals_hugging_face_and_rest_generate(server, model_dir, datastore_dir) -> None:
    want = reference(PROMPT)
    cli = CliRunner().invoke(generate, [
        "--model", str(model_dir), "--datastore", str(datastore_dir), "--prompt", PROMPT,
        "--max-new-tokens", str(NEW_TOKENS), "--json"], catch_exceptions=False)  # fmt: skip
    assert json.loads(cli.stdout)["tokens"] == want
    client = openai_client(server.url)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW_TOKENS,
                                    temperature=0)  # fmt: skip
    assert out.choices[0].text == text_of(want)
    assert out.usage.completion_tokens == len(want) and out.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model="tiny", prompt=[5, 7, 9, 11],
                                            max_tokens=NEW_TOKENS, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == text_of(want)


def test_chat_equals_hugging_face_greedy_on_the_templated_prompt(server) -> None:
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    ids = tokenizer_with_template().apply_chat_template(messages, add_generation_prompt=True)
    want = hf_greedy(make_model("llama"), ids, 12)
    client = openai_client(server.url)
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    assert out.choices[0].message.content == text_of(want)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=12, stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text_of(want)


def test_drafting_is_used_and_can_be_switched_off_per_request(server) -> None:
    client = openai_client(server.url)
    before = metrics(server)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW_TOKENS)
    middle = metrics(server)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=NEW_TOKENS,
                                      extra_body={"drafting": False})  # fmt: skip
    after = metrics(server)
    assert plain.choices[0].text == out.choices[0].text == text_of(reference(PROMPT))

    def delta(name, a, b):
        return metric_value(b, f"rest_decoder_{name}") - metric_value(a, f"rest_decoder_{name}")

    tokens = out.usage.completion_tokens
    assert delta("spec_decode_num_accepted_tokens_total", before, middle) > tokens / 2
    assert delta("sequence_steps_total", before, middle) < tokens / 2
    assert delta("spec_decode_num_accepted_tokens_total", middle, after) == 0
    assert delta("spec_decode_num_draft_tokens_total", middle, after) == 0
    assert delta("sequence_steps_total", middle, after) == tokens  # one token per step
    assert delta("generation_tokens_total", middle, after) == tokens


def test_concurrent_requests_each_equal_their_single_request_output(server) -> None:
    client = openai_client(server.url)
    prompts = word_prompts(8)
    kinds = [(i % 2 == 0, i % 3 != 0) for i in range(len(prompts))]  # (stream, drafting)

    def ask(prompt, stream, drafting):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS,
                                        stream=stream, extra_body={"drafting": drafting})
        return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text

    single = [ask(p, False, True) for p in prompts]
    assert single == [text_of(reference(p)) for p in prompts]
    before = metrics(server)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda a: ask(a[0], *a[1]), zip(prompts, kinds)))
    after = metrics(server)
    assert together == single
    bucket = 'le="1.0"'
    steps = (metric_value(after, "rest_decoder_batch_size_count")
             - metric_value(before, "rest_decoder_batch_size_count"))  # fmt: skip
    alone = (metric_value(after, "rest_decoder_batch_size_bucket", bucket)
             - metric_value(before, "rest_decoder_batch_size_bucket", bucket))  # fmt: skip
    assert alone < steps / 2  # most steps decoded several sequences together


def test_a_client_that_disconnects_mid_stream_leaves_the_batch(server) -> None:
    client = openai_client(server.url)
    others = word_prompts(3, seed=7)
    want = [text_of(reference(p)) for p in others]
    aborted = metric_value(metrics(server), "rest_decoder_requests_total", 'finish_reason="abort"')
    results: dict[str, str] = {}

    def full(prompt):
        chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS,
                                           stream=True)  # fmt: skip
        results[prompt] = "".join(c.choices[0].text for c in chunks)

    gone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_POSITIONS - 8,
                                     stream=True, extra_body={"drafting": False})  # fmt: skip
    threads = [threading.Thread(target=full, args=(p,)) for p in others]
    for t in threads:
        t.start()
    assert next(iter(gone)).choices[0].text
    gone.close()  # goes away after one chunk, with most of its tokens still to come

    def abort_counted() -> bool:
        return metric_value(metrics(server), "rest_decoder_requests_total",
                            'finish_reason="abort"') == aborted + 1  # fmt: skip

    assert wait_until(abort_counted, 30, 0.05)
    for t in threads:
        t.join(60)
    assert [results[p] for p in others] == want
    assert wait_until(lambda: metric_value(metrics(server), "rest_decoder_requests_running") == 0)
    assert httpx.get(f"{server.url}/health").json()["in_flight"] == 0


def test_bad_requests_get_4xx_with_an_openai_error_body(server) -> None:
    client = openai_client(server.url)
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=-1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=[5] * (MAX_POSITIONS + 10), max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert f"maximum context length is {MAX_POSITIONS} tokens" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_POSITIONS)
    response = httpx.post(f"{server.url}/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "w5"}], "n": 3})  # fmt: skip
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_sigterm_drains_requests_in_flight_and_exits_0(model_dir, tmp_path) -> None:
    # One sequence decodes at a time, so that the requests queued behind it are still in flight
    # when the signal arrives: a single 160-token stream takes about 0.2 s, about as long as
    # uvicorn takes to notice a signal, and may already be over.
    server = ServerProcess("--model", str(model_dir), "--served-model-name", "tiny", "--budget",
                           "8", "--max-batch", "1", log_path=tmp_path / "server.log",
                           env=ONE_THREAD)  # fmt: skip
    try:
        n, clients = 160, 6
        want = text_of(reference(PROMPT, n))

        def stream_text() -> str:
            stream = openai_client(server.url).completions.create(
                model="tiny", prompt=PROMPT, max_tokens=n, stream=True,
                extra_body={"drafting": False})  # fmt: skip
            return "".join(chunk.choices[0].text for chunk in stream)

        prompt_tokens = len(tokenizer_with_template()(PROMPT)["input_ids"])

        def admitted() -> bool:
            metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
            admitted = metric_value(metrics, "rest_decoder_prompt_tokens_total") / prompt_tokens
            return admitted == clients

        with ThreadPoolExecutor(clients) as pool:
            texts = [pool.submit(stream_text) for _ in range(clients)]
            assert wait_until(admitted, 30, 0.005), "the requests were never all admitted"
            server.terminate()
            with pytest.raises((httpx.ConnectError, httpx.HTTPStatusError)):
                # New requests are refused: 503 until the port closes, then no connection at all.
                assert wait_until(lambda: httpx.get(f"{server.url}/health", timeout=5)
                                  .raise_for_status() is None and False, 10, 0.02)  # fmt: skip
            assert [text.result(timeout=60) for text in texts] == [want] * clients
        assert server.wait(60) == 0
        assert "Waiting for connections to close" in server.log()  # streams were still in flight
    finally:
        server.kill()


def test_a_model_that_cannot_be_loaded_ends_with_one_line(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    server = ServerProcess("--model", str(tmp_path / "empty"), log_path=tmp_path / "log",
                           ready_timeout=0, env=ONE_THREAD)  # fmt: skip
    try:
        assert server.wait(60) == 1
        errors = [line for line in server.log().splitlines() if "decoder-server: error:" in line]
        assert len(errors) == 1 and "empty" in errors[0]
        assert "Traceback" not in server.log()
    finally:
        server.kill()
