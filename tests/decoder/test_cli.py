"""decoder/cli.py: the generate and chat commands on a model saved to a directory."""

from __future__ import annotations

import json
from pathlib import Path

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
    (["--retriever", "h:1"], {"REST_RETRIEVER_TOKEN": " "}, "REST_RETRIEVER_TOKEN is empty"),
    (["--retriever", "h:1"], {"REST_RETRIEVER_TOKEN": "secret\n"}, "REST_RETRIEVER_TOKEN starts or ends with whitespace"),
    (["--retriever", "h:1", "--token", "two words"], {}, "--token holds characters a gRPC header cannot carry"),
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


# ----------------------------------------------------------------------------------------------
# Prompts from files and stdin; chat's system message, /reset, Ctrl-C and history


def test_generate_reads_the_prompt_from_a_file_or_stdin(model_dir, tmp_path) -> None:
    want = hf_greedy(make_model("llama"), IDS, 6)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT)
    for args, stdin in ((["--prompt-file", str(prompt_file)], None), (["--prompt-file", "-"], PROMPT), ([], PROMPT)):
        result = run(generate, ["--model", model_dir, "--max-new-tokens", "6", "--json", *args], input=stdin)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["tokens"] == want
    result = CliRunner().invoke(generate, ["--model", model_dir, "--prompt", "x", "--prompt-file", str(prompt_file)])
    assert result.exit_code == 2 and "not both" in result.stderr


def test_chat_system_message_and_reset(model_dir, tmp_path) -> None:
    tokenizer = make_tokenizer()
    first = tokenizer("w3 w5 w6 ")["input_ids"]  # the template renders the system message first
    answer = tokenizer.decode(hf_greedy(make_model("llama"), first, 6), skip_special_tokens=True)
    script = "w5 w6\n/reset\nw5 w6\n"
    result = run(chat, ["--model", model_dir, "--max-new-tokens", "6", "--system", "w3", "--no-show-stats",
                        "--history-file", str(tmp_path / "history")], input=script)  # fmt: skip
    assert result.exit_code == 0, result.output
    # After /reset the conversation is the system message alone again: the same answer twice.
    assert result.stdout.splitlines() == [answer, answer]
    assert "[conversation reset]" in result.stderr


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A model that can talk for a long time: no EOS, positions for 64K tokens."""
    from transformers import AutoModelForCausalLM

    from tests.decoder.helpers import model_config

    import torch

    path = tmp_path_factory.mktemp("long-model")
    torch.manual_seed(0)
    config = model_config("llama", max_position_embeddings=1 << 16, eos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return str(path)


def test_ctrl_c_stops_the_answer_not_the_chat_and_lines_have_history(long_model_dir, tmp_path) -> None:
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    root = str(Path(__file__).resolve().parents[2])
    history = tmp_path / "history"
    child = pexpect.spawn(
        sys.executable, ["-c", "from rest.cli import main; main()", "chat", "--model", long_model_dir,
                         "--max-new-tokens", "60000", "--budget", "0", "--no-show-stats",
                         "--history-file", str(history)],
        env={**os.environ, "PYTHONPATH": root, "TERM": "dumb"}, encoding="utf-8", timeout=120,
    )  # fmt: skip
    try:
        child.expect_exact("> ")
        child.sendline("w5 w6")
        child.expect(r"w\d+ w\d+ w\d+")  # the answer is streaming
        child.sendintr()  # Ctrl-C
        child.expect_exact("[answer stopped]", timeout=30)
        child.expect_exact("> ")
        child.send("\x1b[A")  # up arrow: the last line again, from readline's history
        child.expect_exact("w5 w6")
        child.send("\r")
        child.expect(r"w\d+ w\d+ w\d+")
        child.sendintr()
        child.expect_exact("[answer stopped]", timeout=30)
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert history.read_text().splitlines()[-2:] == ["w5 w6", "/exit"]


# ----------------------------------------------------------------------------------------------
# Errors of rest generate, through the console script's entry point: one line, status 1 or 2


def start_rest(*args: str, env: dict | None = None):
    """``rest ARGS`` as users run it (the console script's entry point), started in a subprocess."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    environ = {k: v for k, v in os.environ.items() if k not in ("REST_DEBUG", "REST_RETRIEVER", "REST_RETRIEVER_TOKEN")}
    return subprocess.Popen([sys.executable, "-c", "from rest.cli import main; main()", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environ | {"PYTHONPATH": root} | (env or {}))  # fmt: skip


def finished(proc):
    import subprocess

    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_generate_errors_are_one_line(model_dir, own_datastore, tmp_path) -> None:
    """Each case in its own process (they run at once: each pays for importing torch)."""
    from tests.rest.test_cli import assert_one_line_error
    from tests.retriever_service.service_testing import ServerProcess, free_port

    base = ["generate", "--prompt", PROMPT, "--max-new-tokens", "4", "--model", model_dir]
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello")
    ds, _ = own_datastore
    server = ServerProcess("--datastore", str(ds), env={"REST_RETRIEVER_TOKEN": TOKEN})
    try:
        cases = [
            (["--model", str(tmp_path / "no-model")], {}, ["no-model does not exist"]),
            (["--retriever", "127.0.0.1:1", "--tls-ca", str(not_pem)], {}, ["--tls-ca", "is not a PEM file"]),
            (["--retriever", f"127.0.0.1:{free_port()}", "--require-retriever"], {},
             ["did not answer", "retriever-server running there"]),
            (["--retriever", server.address, "--require-retriever"], {"REST_RETRIEVER_TOKEN": "wrong"},
             ["UNAUTHENTICATED", "token"]),
        ]  # fmt: skip
        procs = [start_rest(*base, *args, env=env) for args, env, _ in cases]
        for proc, (_, _, fragments) in zip(procs, cases):
            assert_one_line_error(finished(proc), 1, *fragments)
    finally:
        server.kill()


# ----------------------------------------------------------------------------------------------
# Generation settings: passed only when given, the model's generation config decides the rest


@pytest.fixture(scope="module")
def configured_model_dir(tmp_path_factory):
    """The test model with a generation config of its own, as instruct models ship them."""
    from transformers import GenerationConfig

    path = tmp_path_factory.mktemp("configured")
    model = make_model("llama")
    model.save_pretrained(path)
    GenerationConfig(do_sample=True, temperature=0.7, top_k=20, repetition_penalty=1.3, eos_token_id=1,
                     pad_token_id=0).save_pretrained(path)  # fmt: skip
    make_tokenizer().save_pretrained(path)
    return str(path)


def generated(model_dir, *args) -> list[int]:
    result = run(generate, ["--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", "12", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["tokens"]


def test_unset_options_leave_the_models_generation_config_in_charge(configured_model_dir) -> None:
    # The saved config samples; --greedy keeps its repetition penalty, as model.generate does.
    want = hf_greedy(make_model("llama"), IDS, 12, repetition_penalty=1.3)
    assert generated(configured_model_dir, "--greedy") == want
    assert generated(configured_model_dir, "--temperature", "0") == want
    assert generated(configured_model_dir, "--greedy", "--repetition-penalty", "1") == hf_greedy(
        make_model("llama"), IDS, 12)
    # Sampling with the config's own temperature, top-k and penalty: repeatable with a seed.
    assert generated(configured_model_dir, "--seed", "3") == generated(configured_model_dir, "--seed", "3")


@pytest.mark.parametrize("args, hf_kwargs", [
    (["--repetition-penalty", "1.5"], {"repetition_penalty": 1.5}),
    (["--no-repeat-ngram-size", "2"], {"no_repeat_ngram_size": 2}),
    (["--min-new-tokens", "12"], {"min_new_tokens": 12}),
    # Filters that keep only the most likely token make sampling greedy: proof they were applied.
    (["--do-sample", "--temperature", "2", "--top-k", "1", "--seed", "1"], {}),
    (["--do-sample", "--temperature", "2", "--min-p", "1", "--seed", "1"], {}),
    (["--do-sample", "--temperature", "2", "--top-p", "0.0001", "--seed", "1"], {}),
])  # fmt: skip
def test_generation_options_reach_the_generator(model_dir, args, hf_kwargs) -> None:
    assert generated(model_dir, *args) == hf_greedy(make_model("llama"), IDS, 12, **hf_kwargs)


def test_sampling_options_change_the_draws_and_match_the_library(model_dir) -> None:
    from decoder import RestGenerator

    sampled = generated(model_dir, "--do-sample", "--temperature", "2", "--seed", "1")
    assert sampled != hf_greedy(make_model("llama"), IDS, 12)
    typical = generated(model_dir, "--do-sample", "--temperature", "2", "--typical-p", "0.3", "--seed", "1")
    library = RestGenerator(make_model("llama"), make_tokenizer()).generate(
        IDS, max_new_tokens=12, do_sample=True, temperature=2.0, typical_p=0.3, seed=1, plain=True)
    assert typical == library.tokens != sampled
