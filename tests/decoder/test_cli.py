"""decoder/cli.py: the generate and chat commands on a model saved to a directory."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from decoder.cli import chat, generate
from tests.decoder.helpers import hf_greedy, make_model, make_tokenizer

PROMPT = "w5 w7 w9 w11"
IDS = [5, 7, 9, 11]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model("llama").save_pretrained(path)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return str(path)


def run(command, args, input=None):
    return CliRunner().invoke(command, args, input=input, catch_exceptions=False)


def test_generate_prints_text_on_stdout_and_statistics_on_stderr(model_dir) -> None:
    want = hf_greedy(make_model("llama"), IDS, 12)
    result = run(generate, ["--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", "12",
                            "--budget", "8"])  # fmt: skip
    assert result.exit_code == 0
    assert result.stdout == make_tokenizer().decode(want, skip_special_tokens=True) + "\n"
    assert "tokens/s" in result.stderr and "M = " in result.stderr


@pytest.mark.parametrize("extra", [[], ["--plain"], ["--no-context-drafts", "--budget", "auto"]])
def test_generate_json(model_dir, extra) -> None:
    want = hf_greedy(make_model("llama"), IDS, 12)
    result = run(generate, ["--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", "12",
                            "--json", *extra])  # fmt: skip
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["tokens"] == want and out["finish_reason"] in ("length", "eos")
    assert out["stats"]["new_tokens"] == len(want)
    if "--plain" in extra:
        assert out["stats"]["steps"] == len(want)


def test_generate_refuses_bad_arguments(model_dir) -> None:
    base = ["--model", model_dir, "--prompt", PROMPT]
    result = CliRunner().invoke(generate, base + ["--budget", "many"])
    assert result.exit_code == 2 and "'auto'" in result.stderr
    result = CliRunner().invoke(generate, base + ["--datastore", model_dir, "--retriever", "h:1"])
    assert result.exit_code == 2 and "not both" in result.stderr


def test_chat_streams_answers_using_the_chat_template(model_dir) -> None:
    tokenizer = make_tokenizer()
    first = tokenizer("w5 w6 ")["input_ids"]  # the template's rendering of one user message
    want = hf_greedy(make_model("llama"), first, 6)
    result = run(chat, ["--model", model_dir, "--max-new-tokens", "6"], input="w5 w6\n\n/exit\n")
    assert result.exit_code == 0
    answer = tokenizer.decode(want, skip_special_tokens=True)
    assert result.stdout.splitlines()[0] == answer
    assert result.stderr.count("tokens/s") == 1  # one answer; the blank line was skipped


def build_own_datastore(path) -> list[int]:
    """A datastore holding the model's own greedy continuation of PROMPT; returns it."""
    from rest.datastore import build_datastore
    from rest.tokenizer import tokenizer_fingerprint, tokenizer_name

    tokenizer = make_tokenizer()
    want = hf_greedy(make_model("llama"), IDS, 12)
    build_datastore(
        path, [IDS + want], vocab_size=len(tokenizer), tokenizer_name=tokenizer_name(tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )  # fmt: skip
    return want


def test_generate_with_a_datastore(model_dir, tmp_path) -> None:
    want = build_own_datastore(tmp_path / "ds")
    result = run(generate, ["--model", model_dir, "--datastore", str(tmp_path / "ds"), "--prompt",
                            PROMPT, "--max-new-tokens", "12", "--budget", "8", "--json",
                            "--no-context-drafts"])  # fmt: skip
    out = json.loads(result.stdout)
    assert out["tokens"] == want and out["stats"]["steps"] < len(want) / 2


def test_generate_with_a_remote_retriever(model_dir, tmp_path) -> None:
    from tests.retriever_service.service_testing import ServerProcess

    want = build_own_datastore(tmp_path / "ds")
    server = ServerProcess("--datastore", str(tmp_path / "ds"))
    try:
        result = run(generate, ["--model", model_dir, "--retriever", server.address, "--prompt", PROMPT,
                                "--max-new-tokens", "12", "--budget", "8", "--json",
                                "--no-context-drafts"])  # fmt: skip
    finally:
        server.kill()
    out = json.loads(result.stdout)
    assert out["tokens"] == want and out["stats"]["steps"] < len(want) / 2
    assert out["stats"]["retrieval_failures"] == 0


def test_the_retriever_and_its_token_come_from_the_environment(model_dir, tmp_path) -> None:
    from tests.retriever_service.service_testing import ServerProcess

    want = build_own_datastore(tmp_path / "ds")
    server = ServerProcess("--datastore", str(tmp_path / "ds"), env={"REST_RETRIEVER_TOKEN": "s3"})
    args = ["--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", "12", "--budget", "8",
            "--json", "--no-context-drafts"]  # fmt: skip
    try:
        result = CliRunner().invoke(generate, args, catch_exceptions=False, env={
            "REST_RETRIEVER": server.address, "REST_RETRIEVER_TOKEN": "s3"})  # fmt: skip
        refused = CliRunner().invoke(generate, args, env={
            "REST_RETRIEVER": server.address, "REST_RETRIEVER_TOKEN": "wrong"})  # fmt: skip
    finally:
        server.kill()
    out = json.loads(result.stdout)
    assert out["tokens"] == want and out["stats"]["steps"] < len(want) / 2
    assert out["stats"]["retrieval_failures"] == 0
    assert refused.exit_code != 0 and "UNAUTHENTICATED" in str(refused.exception)


def test_an_explicit_datastore_wins_over_the_environment_retriever(model_dir, tmp_path) -> None:
    want = build_own_datastore(tmp_path / "ds")
    args = ["--model", model_dir, "--datastore", str(tmp_path / "ds"), "--prompt", PROMPT,
            "--max-new-tokens", "12", "--budget", "8", "--json", "--no-context-drafts"]
    result = CliRunner().invoke(generate, args, env={"REST_RETRIEVER": "127.0.0.1:1"},
                                catch_exceptions=False)  # fmt: skip
    assert json.loads(result.stdout)["tokens"] == want


def test_mutual_tls_needs_both_files(model_dir) -> None:
    base = ["--model", model_dir, "--prompt", PROMPT, "--retriever", "127.0.0.1:1"]
    result = CliRunner().invoke(generate, base + ["--tls-cert", model_dir + "/config.json"])
    assert result.exit_code == 2 and "--tls-cert and --tls-key" in result.stderr
