"""``retriever-server``'s command line: every option is checked and named, every ordinary error
is one line with status 1 (2 for a bad option), tracebacks only with --debug or REST_DEBUG=1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from rest.cli_errors import run
from retriever_service.server import serve_command
from tests.retriever_service.service_testing import ROOT


def serve(capsys, *args: str, env: dict | None = None) -> tuple[int, list[str]]:
    """Run the command in this process as its console script does: (status, stderr lines)."""
    saved = {name: os.environ.get(name) for name in (env or {})}
    os.environ.update(env or {})
    try:
        with pytest.raises(SystemExit) as done:
            run(serve_command, "retriever-server", list(args))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return done.value.code, err.strip().splitlines()


def one_error_line(status: int, lines: list[str]) -> str:
    assert status == 1, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("retriever-server: error: ")
    return lines[0]


def usage_error(status: int, lines: list[str]) -> str:
    """Click's usage error: exit 2, the usage line, then one line that names the option."""
    assert status == 2, lines
    assert lines[0].startswith("Usage: retriever-server")
    assert lines[-1].startswith("Error: ")
    return lines[-1]


@pytest.mark.parametrize(("option", "value"), [
    ("--port", "65536"), ("--port", "99999"), ("--port", "-1"), ("--port", "http"),
    ("--max-message-bytes", "-5"), ("--max-message-bytes", str(2**31)),
    ("--max-context-tokens", "0"), ("--workers", "0"), ("--workers", "-1"),
    ("--max-concurrent-searches", "-1"), ("--inline-search-us", "-1"),
    ("--grace-s", "-1"), ("--grace-s", "nan"), ("--keepalive-time-s", "0"),
    ("--keepalive-time-s", "inf"), ("--keepalive-timeout-s", "nan"), ("--log-level", "LOUD"),
])
def test_an_option_out_of_range_is_a_usage_error_naming_it(capsys, datastore_dir, option, value):
    line = usage_error(*serve(capsys, "--datastore", str(datastore_dir), option, value))
    assert f"'{option}'" in line, line


def test_options_that_contradict_each_other_are_usage_errors(capsys, datastore_dir, certs):
    ds = ("--datastore", str(datastore_dir))
    assert "--tls-key" in usage_error(*serve(capsys, *ds, "--tls-cert", str(certs / "server.pem")))
    line = usage_error(*serve(capsys, *ds, "--tls-client-ca", str(certs / "ca.pem")))
    assert "--tls-client-ca" in line
    assert "--shard" in usage_error(*serve(capsys, *ds, "--shard", "shard-00000",
                                           "--shard", "shard-00000"))


@pytest.mark.parametrize(("args", "env", "named"), [
    (("--token", ""), {}, "--token is empty"),
    (("--token", "   "), {}, "--token is empty"),
    ((), {"REST_RETRIEVER_TOKEN": ""}, "REST_RETRIEVER_TOKEN is empty"),
    ((), {"REST_RETRIEVER_TOKEN": "s3cret\n"}, "REST_RETRIEVER_TOKEN starts or ends with"),
    (("--token", "two words"), {}, "--token holds characters"),
], ids=["option", "blank-option", "variable", "newline", "space"])
def test_an_empty_or_unsendable_token_is_refused(capsys, datastore_dir, args, env, named):
    line = usage_error(*serve(capsys, "--datastore", str(datastore_dir), *args, env=env))
    assert named in line, line


def test_a_missing_datastore_is_a_usage_error(capsys, tmp_path):
    line = usage_error(*serve(capsys, "--datastore", str(tmp_path / "nowhere")))
    assert "'--datastore'" in line and "does not exist" in line


def test_a_corrupt_datastore_is_one_line(capsys, tmp_path, datastore_dir):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(datastore_dir, corrupt)
    (corrupt / "manifest.json").write_text("{")
    line = one_error_line(*serve(capsys, "--datastore", str(corrupt)))
    assert f"cannot serve {corrupt}" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "manifest.json" in one_error_line(*serve(capsys, "--datastore", str(empty)))


def test_an_unknown_shard_is_one_line_listing_the_shards(capsys, datastore_dir, datastore):
    line = one_error_line(*serve(capsys, "--datastore", str(datastore_dir), "--shard", "nope"))
    assert "--shard" in line and "nope" in line and datastore.shard_names[-1] in line


def test_a_port_in_use_is_one_line_that_says_so(capsys, datastore_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error_line(*serve(capsys, "--datastore", str(datastore_dir), "--port",
                                     str(port)))
    assert f"--port {port} is in use" in line


@pytest.mark.parametrize(("host", "expected"), [
    ("host.invalid", "--host host.invalid does not resolve"),
    ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"),  # TEST-NET-1
])
def test_a_host_that_cannot_be_bound_is_one_line_that_says_why(capsys, datastore_dir, host,
                                                               expected):
    line = one_error_line(*serve(capsys, "--datastore", str(datastore_dir), "--host", host,
                                 "--port", "0"))
    assert expected in line, line


@pytest.fixture(scope="module")
def bad_tls_files(certs, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-tls")
    (out / "junk.pem").write_text("not a certificate\n")
    (out / "empty.pem").write_bytes(b"")
    encrypted = out / "encrypted.key"
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        subprocess.run(["openssl", "pkey", "-in", str(certs / "server.key"), "-aes256",
                        "-passout", "pass:secret", "-out", str(encrypted)], check=True,
                       capture_output=True, timeout=60)
    else:
        key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), None)
        encrypted.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
    return out


@pytest.mark.parametrize(("cert", "key", "client_ca", "expected"), [
    ("server.pem", "client.key", None, "is not the key of the certificate"),
    ("server.pem", "BAD/encrypted.key", None, "is encrypted"),
    ("server.pem", "BAD/junk.pem", None, "--tls-key {key}: not a PEM private key"),
    ("server.pem", "server.pem", None, "--tls-key {key}: not a PEM private key"),
    ("BAD/junk.pem", "server.key", None, "--tls-cert {cert}: not a PEM certificate"),
    ("server.key", "server.pem", None, "--tls-cert {cert}: not a PEM certificate"),
    ("server.pem", "server.key", "BAD/empty.pem", "--tls-client-ca {ca}: not a PEM certificate"),
], ids=["mismatch", "encrypted", "junk-key", "cert-as-key", "junk-cert", "swapped", "empty-ca"])
def test_a_bad_tls_file_is_one_line_about_the_file(capsys, datastore_dir, certs, bad_tls_files,
                                                   cert, key, client_ca, expected):
    def path(name):
        return str(bad_tls_files / name[4:]) if name.startswith("BAD/") else str(certs / name)

    args = ["--datastore", str(datastore_dir), "--port", "0",
            "--tls-cert", path(cert), "--tls-key", path(key)]
    if client_ca:
        args += ["--tls-client-ca", path(client_ca)]
    line = one_error_line(*serve(capsys, *args))
    assert expected.format(cert=path(cert), key=path(key), ca=path(client_ca or "")) in line, line
    assert "in use" not in line


def test_the_console_entry_point_is_one_line_and_debug_shows_the_traceback(datastore_dir):
    def server(*args, env=None):
        environ = {k: v for k, v in os.environ.items() if k != "REST_DEBUG"}
        return subprocess.run(
            [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore_dir),
             *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={**environ, "PYTHONPATH": str(ROOT), **(env or {})})

    done = server("--shard", "nope")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "Traceback" not in done.stderr
    for traced in (server("--shard", "nope", "--debug"),
                   server("--shard", "nope", env={"REST_DEBUG": "1"})):
        assert traced.returncode == 1
        assert "Traceback" in traced.stderr and "unknown shard" in traced.stderr
    assert server("--port", "99999").returncode == 2
