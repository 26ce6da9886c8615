"""decoder/server/cli.py: option errors end with one line before any model is loaded."""

from __future__ import annotations

import socket

import pytest

from decoder.server.cli import command, context_limit
from rest.cli_errors import run
from tests.decoder.helpers import model_config


def run_server(capsys, *args: str) -> tuple[int, list[str]]:
    """``decoder-server ARGS`` as its console script runs it: exit status and stderr lines."""
    with pytest.raises(SystemExit) as exited:
        run(command, "decoder-server", list(args))
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_missing_model_directory_is_one_line(capsys, tmp_path) -> None:
    status, err = run_server(capsys, "--model", str(tmp_path / "nowhere"))
    assert status == 1
    assert err == [f"decoder-server: error: --model {tmp_path / 'nowhere'}: no such directory"]


def test_a_port_in_use_is_one_line(capsys, tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = run_server(capsys, "--model", str(tmp_path), "--port", str(port))
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"decoder-server: error: cannot listen on 127.0.0.1:{port}")


def test_usage_errors_exit_2(capsys, tmp_path) -> None:
    status, err = run_server(capsys, "--model", str(tmp_path), "--max-batch", "0")
    assert status == 2 and "--max-batch" in err[-1]
    status, err = run_server(capsys, "--model", str(tmp_path), "--datastore", str(tmp_path),
                             "--retriever", "127.0.0.1:1")  # fmt: skip
    assert status == 2 and "not both" in err[-1]
    status, err = run_server(capsys, "--model", str(tmp_path), "--retriever", "127.0.0.1:1",
                             "--tls-key", str(tmp_path))  # fmt: skip
    assert status == 2


def test_help_names_every_option_of_the_deployment_interface(capsys) -> None:
    with pytest.raises(SystemExit):
        run(command, "decoder-server", ["--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--datastore", "--retriever", "REST_RETRIEVER", "--token",
                   "REST_RETRIEVER_TOKEN", "--tls-ca", "--tls-cert", "--tls-key",
                   "--tls-server-name", "--host", "--port", "--dtype", "--device", "--max-batch",
                   "--served-model-name", "--log-level"):  # fmt: skip
        assert option in out


def test_context_limit_comes_from_the_config() -> None:
    assert context_limit(model_config("llama")) == 256
    assert context_limit(model_config("gpt2")) == 256
    config = model_config("llama")
    del config.max_position_embeddings
    assert context_limit(config) is None
