"""rest/cli.py: the datastore commands end to end with a tokenizer saved in a local folder, the
command list, and what ``rest`` imports to start."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from rest.cli import cli

ROOT = Path(__file__).resolve().parents[2]
CODE = ["def add(a, b):\n    return a + b\n", "def mul(a, b):\n    return a * b\n"] * 20


def make_tokenizer_dir(path: Path) -> Path:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CODE, vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "code.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    return src


@pytest.fixture(scope="module")
def datastore_dir(tmp_path_factory, tokenizer_dir, jsonl) -> Path:
    ds = tmp_path_factory.mktemp("ds") / "ds"
    r = invoke(["datastore", "build", "--tokenizer", str(tokenizer_dir), "--input", str(jsonl), "--out", str(ds)])
    assert r.exit_code == 0, r.output
    return ds


def invoke(args, **kwargs):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kwargs)


def rest(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``rest ARGS`` as users run it (the console script's entry point), in a subprocess."""
    environ = {k: v for k, v in os.environ.items() if k != "REST_DEBUG"}
    environ |= {"PYTHONPATH": str(ROOT), "COLUMNS": "200"} | (env or {})
    return subprocess.run([sys.executable, "-c", "from rest.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, env=environ, timeout=120)


def test_build_info_query_verify(datastore_dir, tokenizer_dir):
    r = invoke(["datastore", "info", str(datastore_dir), "--json"])
    summary = json.loads(r.stdout)
    assert summary["info"]["n_docs"] == 40 and summary["info"]["n_tokens"] == 560
    assert summary["bytes_on_disk"] == sum(p.stat().st_size for p in datastore_dir.iterdir())
    assert [s["name"] for s in summary["shards"]] == ["shard-00000"]
    r = invoke(["datastore", "verify", str(datastore_dir)])
    assert r.exit_code == 0 and r.output.startswith("ok:")
    r = invoke(["datastore", "query", str(datastore_dir), "--text", "def add(a, b):\n    return", "--json",
                "--tokenizer", str(tokenizer_dir)])
    out = json.loads(r.stdout)
    assert out["match_length"] >= 2 and out["occurrences"] == 20
    assert out["paths"][0] == " a"  # the most frequent continuation comes first


def test_info_and_query_are_readable_by_default(datastore_dir):
    r = invoke(["datastore", "info", str(datastore_dir)], terminal_width=200)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0] == str(datastore_dir.resolve())
    assert "560 in 40 documents" in r.output and "1 shard(s)" in r.output
    assert any(line.startswith("shard-00000") and "KiB" in line for line in lines)
    r = invoke(["datastore", "query", str(datastore_dir), "--text", "def mul(a, b):"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "20 occurrences" in r.output
    # The decoded continuation and its count, on one row.
    assert any(line.split()[:2] == ["20", "100%"] and "return a * b" in line for line in r.output.splitlines())


def test_query_by_token_ids_decodes_with_the_recorded_tokenizer(datastore_dir):
    ids = json.loads(invoke(["datastore", "query", str(datastore_dir), "--text", "def add", "--json"]).stdout)["context"]
    r = invoke(["datastore", "query", str(datastore_dir), "--tokens", ",".join(map(str, ids)), "--json"])
    assert json.loads(r.stdout)["paths"][0] == "("


def test_the_tokenizer_path_is_recorded_so_that_it_reloads_from_anywhere(tmp_path, jsonl):
    make_tokenizer_dir(tmp_path / "tok")
    r = rest("datastore", "build", "--tokenizer", "tok", "--input", str(jsonl), "--out", "ds", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = rest("datastore", "query", str(tmp_path / "ds"), "--text", "def add", "--json", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["occurrences"] == 20
    info = json.loads(rest("datastore", "info", "../ds", "--json", cwd=elsewhere).stdout)
    assert info["info"]["tokenizer_name"] == f"PreTrainedTokenizerFast:{(tmp_path / 'tok').resolve()}"


def test_folders_give_their_text_files_with_include_and_exclude(tmp_path, tokenizer_dir):
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "pkg" / "a.py").write_text(CODE[0])
    (src / "pkg" / "notes.txt").write_text(CODE[1])
    (src / "pkg" / "tests").mkdir()
    (src / "pkg" / "tests" / "test_a.py").write_text(CODE[1])
    (src / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" + b"x" * 100)
    (src / ".git" / "config").write_text("[core]\n")
    out = tmp_path / "ds"
    r = invoke(["datastore", "build", "--tokenizer", str(tokenizer_dir), "--input", str(src), "--out", str(out),
                "--json"])
    assert r.exit_code == 0, r.output
    read = json.loads(r.stdout)["input"]
    assert (read["files"], read["binary_files"], read["excluded_files"], read["documents"]) == (3, 1, 1, 3)
    r = invoke(["datastore", "build", "--tokenizer", str(tokenizer_dir), "--input", str(src), "--out", str(out),
                "--overwrite", "--include", "*.py", "--exclude", "tests/*", "--exclude", "*/tests/*"])
    assert r.exit_code == 0, r.output
    assert "built 14 tokens from 1 document from 1 file (skipped: 4 excluded)" in r.stderr  # the .pyc is not *.py
    assert json.loads(invoke(["datastore", "info", str(out), "--json"]).stdout)["info"]["n_docs"] == 1


@pytest.mark.parametrize("value, message", [
    ("0", "must be between 2 and"), ("-5", "must be between 2 and"), ("1", "must be between 2 and"),
    ("99999999999999", "must be between 2 and"),
])  # fmt: skip
def test_shard_tokens_is_validated(tmp_path, tokenizer_dir, jsonl, value, message):
    r = CliRunner().invoke(cli, ["datastore", "build", "--tokenizer", str(tokenizer_dir), "--input", str(jsonl),
                                 "--out", str(tmp_path / "ds"), "--shard-tokens", value])
    assert r.exit_code == 2 and message in r.output and "--shard-tokens" in r.output
    assert not (tmp_path / "ds").exists()


def test_shard_tokens_makes_shards(tmp_path, tokenizer_dir, jsonl):
    r = invoke(["datastore", "build", "--tokenizer", str(tokenizer_dir), "--input", str(jsonl), "--out",
                str(tmp_path / "ds"), "--shard-tokens", "100", "--json"])
    assert len(json.loads(r.stdout)["shards"]) > 1


def test_build_refuses_missing_inputs(tmp_path):
    r = CliRunner().invoke(cli, ["datastore", "build", "--tokenizer", "x", "--out", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "give input files" in r.output


def test_help_version_and_the_renamed_serve():
    assert "-h, --help" in invoke(["-h"]).output
    assert invoke(["datastore", "build", "-h"]).output.startswith("Usage: ")
    r = invoke(["--version"])
    assert r.output.startswith("rest ") and "datastore format" in r.output
    r = CliRunner().invoke(cli, ["serve", "--datastore", "x"])
    assert r.exit_code == 2 and "'rest datastore serve'" in r.output
    assert "serve" not in [line.split()[0] for line in invoke(["-h"]).output.splitlines()
                           if line.startswith("  ") and line.split()]
    assert "serve" in invoke(["datastore", "-h"]).output


def test_the_listed_help_of_lazy_commands_is_the_commands_own():
    """The one-line help written in rest/cli.py (so that listing commands imports nothing) must
    say what each command's own docstring says."""
    import importlib

    for group in (cli, cli.commands["datastore"]):
        for name, (target, listed) in group.lazy.items():
            module, attr = target.split(":")
            command: click.Command = getattr(importlib.import_module(module), attr)
            own = command.get_short_help_str(limit=300)
            assert listed.startswith(own.rstrip(".")), f"update the help of {name!r} in rest/cli.py: {own!r}"


IMPORT_PROBE = """
import sys
from rest.cli import main
try:
    main()
except SystemExit as done:
    heavy = sorted(m for m in ("torch", "transformers", "grpc") if m in sys.modules)
    print("HEAVY:", ",".join(heavy), file=sys.stderr)
    raise
"""


@pytest.mark.parametrize("args", [
    ["--help"], ["datastore", "--help"], ["datastore", "info", "{ds}"], ["datastore", "query", "{ds}", "--tokens", "1,2"],
    ["datastore", "query", "{ds}", "--text", "def add"], ["datastore", "verify", "{ds}"],
])  # fmt: skip
def test_help_and_datastore_commands_import_neither_torch_nor_transformers(datastore_dir, args):
    args = [a.replace("{ds}", str(datastore_dir)) for a in args]
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "HEAVY: \n" in done.stderr, done.stderr


# ----------------------------------------------------------------------------------------------
# Errors: one line that says what was wrong and what to do; status 1, or 2 for usage


def assert_one_line_error(done: subprocess.CompletedProcess, status: int, *fragments: str) -> None:
    assert done.returncode == status, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    if status == 1:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("rest: error: "), done.stderr
        message = lines[0]
    else:  # click's usage text, then the error on one line
        message = next(line for line in done.stderr.splitlines() if line.startswith("Error: "))
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def damaged_datastore(tmp_path_factory, datastore_dir) -> Path:
    import shutil

    copy = tmp_path_factory.mktemp("damaged") / "ds"
    shutil.copytree(datastore_dir, copy)
    shard = next(copy.glob("*.rds"))
    with shard.open("r+b") as f:
        f.truncate(100)
    return copy


@pytest.mark.parametrize("args, status, fragments", [
    (["datastore", "info", "{tmp}/missing"], 1, ["missing does not exist", "rest datastore build"]),
    (["datastore", "query", "{tmp}/missing", "--tokens", "1"], 1, ["does not exist"]),
    (["datastore", "info", "{jsonl}"], 1, ["is a file, not a datastore directory"]),
    (["datastore", "info", "{damaged}"], 1, ["truncated", "build it again"]),
    (["datastore", "verify", "{damaged}"], 1, ["truncated", "build it again"]),
    (["datastore", "build", "--tokenizer", "{tok}", "--input", "{jsonl}", "--field", "body", "--out", "{tmp}/new"],
     1, ["no field 'body'", "use --field"]),
    (["datastore", "build", "--tokenizer", "{tok}", "--input", "{tmp}/missing.jsonl", "--out", "{tmp}/new"],
     1, ["missing.jsonl does not exist"]),
    (["datastore", "build", "--tokenizer", "{tmp}/no-tokenizer", "--input", "{jsonl}", "--out", "{tmp}/new"],
     1, ["no-tokenizer does not exist"]),
    (["datastore", "build", "--tokenizer", "{tok}", "--input", "{jsonl}", "--out", "{ds}"],
     1, ["already exists", "--overwrite"]),
    (["datastore", "build", "--tokenizer", "{tok}", "--input", "{jsonl}", "--out", "{tmp}/new", "--shard-tokens", "0"],
     2, ["--shard-tokens", "must be between 2 and"]),
    (["datastore", "query", "{ds}", "--tokens", "99999"], 1, ["outside the vocabulary"]),
    (["datastore", "query", "{ds}", "--tokens", "1,x"], 2, ["--tokens", "comma-separated integers"]),
    (["datastore", "query", "{ds}", "--tokens", "1", "--budget", "-1"], 2, ["--budget"]),
    (["datastore", "serve", "--datastore", "{damaged}"], 1, ["truncated"]),
    (["datastore", "nope"], 2, ["No such command 'nope'"]),
    (["serve"], 2, ["'rest datastore serve'"]),
])  # fmt: skip
def test_errors_are_one_line(tmp_path, datastore_dir, damaged_datastore, tokenizer_dir, jsonl, args, status, fragments):
    names = {"{tmp}": str(tmp_path), "{ds}": str(datastore_dir), "{damaged}": str(damaged_datastore),
             "{tok}": str(tokenizer_dir), "{jsonl}": str(jsonl)}  # fmt: skip
    for key, value in names.items():
        args = [a.replace(key, value) for a in args]
    assert_one_line_error(rest(*args), status, *fragments)
    assert not (tmp_path / "new").exists()


def test_debug_shows_the_traceback(tmp_path):
    done = rest("datastore", "info", str(tmp_path / "missing"), "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr
    done = rest("datastore", "info", str(tmp_path / "missing"), env={"REST_DEBUG": "1"})
    assert done.returncode == 1 and "Traceback" in done.stderr
