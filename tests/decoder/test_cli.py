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


# ----------------------------------------------------------------------------------------------
# The retriever options (shared by generate, chat, bench and decoder-server)

from tests.retriever_service.conftest import certs  # noqa: E402,F401 - the fixture

TOKEN = "cli-s3cret"


@pytest.fixture(scope="module")
def own_datastore(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "ds"
    return path, build_own_datastore(path)


def generate_json(args, env=None):
    result = CliRunner(env=env).invoke(generate, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def drafted_from_the_server(out, want) -> bool:
    return (out["tokens"] == want and out["stats"]["retrieval_failures"] == 0
            and out["stats"]["steps"] < len(want) / 2)


BASE = ["--prompt", PROMPT, "--max-new-tokens", "12", "--budget", "8", "--json", "--no-context-drafts"]


def test_retriever_and_token_from_the_environment(model_dir, own_datastore) -> None:
    from tests.retriever_service.service_testing import ServerProcess

    ds, want = own_datastore
    server = ServerProcess("--datastore", str(ds), env={"REST_RETRIEVER_TOKEN": TOKEN})
    try:
        out = generate_json(["--model", model_dir, *BASE],
                            env={"REST_RETRIEVER": server.address, "REST_RETRIEVER_TOKEN": TOKEN})
        assert drafted_from_the_server(out, want)
        # The same with the options, and an explicit --datastore beats $REST_RETRIEVER.
        out = generate_json(["--model", model_dir, "--retriever", server.address, "--token", TOKEN, *BASE])
        assert drafted_from_the_server(out, want)
        out = generate_json(["--model", model_dir, "--datastore", str(ds), *BASE],
                            env={"REST_RETRIEVER": "127.0.0.1:1"})
        assert out["tokens"] == want and out["stats"]["retrieval_failures"] == 0
    finally:
        server.kill()


def test_mutual_tls_with_a_token_and_a_server_name(model_dir, own_datastore, certs) -> None:  # noqa: F811
    from tests.retriever_service.service_testing import ServerProcess

    ds, want = own_datastore
    server = ServerProcess("--datastore", str(ds), "--tls-cert", str(certs / "server.pem"),
                           "--tls-key", str(certs / "server.key"), "--tls-client-ca", str(certs / "ca.pem"),
                           env={"REST_RETRIEVER_TOKEN": TOKEN})  # fmt: skip
    try:
        tls = ["--tls-ca", str(certs / "ca.pem"), "--tls-cert", str(certs / "client.pem"),
               "--tls-key", str(certs / "client.key")]  # fmt: skip
        out = generate_json(["--model", model_dir, "--retriever", f"localhost:{server.port}", *tls, *BASE],
                            env={"REST_RETRIEVER_TOKEN": TOKEN})
        assert drafted_from_the_server(out, want)
        out = generate_json(["--model", model_dir, "--retriever", server.address, *tls,
                             "--tls-server-name", "localhost", "--token", TOKEN, *BASE])
        assert drafted_from_the_server(out, want)
    finally:
        server.kill()


@pytest.mark.parametrize("args, env, message", [
    (["--retriever", "h:1", "--token", ""], {}, "--token is empty"),
    (["--retriever", "h:1"], {"REST_RETRIEVER_TOKEN": " "}, "$REST_RETRIEVER_TOKEN is set but empty"),
    (["--retriever", "h:1", "--tls-cert", "{ca}"], {}, "--tls-cert and --tls-key go together"),
    (["--datastore", "{model}", "--tls-ca", "{ca}"], {}, "--tls-ca: only for --retriever"),
    (["--datastore", "{model}", "--token", "x"], {}, "--token: only for --retriever"),
    (["--retriever", "no-port"], {}, "expected HOST:PORT"),
    (["--retriever", "h:99999"], {}, "expected HOST:PORT"),
    (["--retriever", "h:1", "--tls-ca", "/no/such/ca.pem"], {}, "does not exist"),
])  # fmt: skip
def test_retriever_options_are_checked(model_dir, certs, args, env, message) -> None:  # noqa: F811
    args = [a.replace("{ca}", str(certs / "ca.pem")).replace("{model}", model_dir) for a in args]
    result = CliRunner(env=env).invoke(generate, ["--model", model_dir, "--prompt", PROMPT, *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_a_tls_file_that_is_not_pem_is_named(model_dir, tmp_path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")
    result = CliRunner().invoke(generate, ["--model", model_dir, "--prompt", PROMPT, "--retriever", "h:1",
                                           "--tls-ca", str(bogus)])  # fmt: skip
    assert result.exit_code == 1
    assert f"--tls-ca {bogus} is not a PEM file" in result.stderr
