"""Every command and the Python code of README.md, run as written, with a tiny model and tiny
files standing in for the real models and corpora it names (the substitutions below). A command
that breaks, or a README that names something the stand-ins do not cover, fails this test.

The Quickstart's ``make demo`` and ``make test`` take minutes (a model is trained; every test
runs): they are checked by ``make -n`` (the targets exist and run ``rest demo`` and pytest), and
``rest demo`` itself runs end to end in tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CODE_MODEL = "/models/CodeLlama-7b-instruct-hf"
CHAT_MODEL = "/models/vicuna-7b-v1.5"
SERVER_ADDRESS = "retriever-host:50051"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def commands(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def save_model(path: Path, chat_template: str | None = None) -> str:
    from transformers import AutoModelForCausalLM

    from tests.decoder.helpers import make_tokenizer, model_config

    import torch

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config("llama", max_position_embeddings=2048)).save_pretrained(path)
    tokenizer = make_tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The folder the README's commands run in, with the files they name."""
    work = tmp_path_factory.mktemp("readme")
    words = [" ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(40)) for i in range(50)]
    (work / "the-stack-python").mkdir()
    pq.write_table(pa.table({"content": words}), work / "the-stack-python" / "part-0.parquet")
    (work / "sharegpt.json").write_text(json.dumps(
        [{"conversations": [{"from": "human", "value": w}, {"from": "gpt", "value": w[::-1]}]} for w in words]))
    project = work / "my-project"
    (project / "tests").mkdir(parents=True)
    (project / "__pycache__").mkdir()
    for i, text in enumerate(words[:10]):
        (project / f"m{i}.py").write_text(text)
    (project / "tests" / "test_m.py").write_text(words[0])
    (project / "__pycache__" / "m0.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0" + b"\1" * 64)
    (work / "models").mkdir()
    return work


@pytest.fixture(scope="module")
def stand_ins(workdir) -> dict[str, str]:
    code = save_model(workdir / "models" / "code")
    chat = save_model(workdir / "models" / "chat", "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    return {CODE_MODEL: code, CHAT_MODEL: chat}


@pytest.fixture(scope="module")
def shims(tmp_path_factory) -> Path:
    """``rest`` and ``retriever-server`` running this checkout (no install needed)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name, target in (("rest", "-c 'from rest.cli import main; main()'"),
                         ("retriever-server", "-m retriever_service.server")):  # fmt: skip
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {target} "$@"\n')
        script.chmod(0o755)
    return bin_dir


def environment(shims: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REST_RETRIEVER")}
    return environ | {"PYTHONPATH": str(ROOT), "PATH": f"{shims}{os.pathsep}{environ['PATH']}",
                      "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def substitute(command: str, stand_ins: dict[str, str]) -> str:
    for real, fake in stand_ins.items():
        command = command.replace(real, fake)
    return command


def test_quickstart_make_targets_exist_and_run_the_demo_and_the_tests(shims):
    quickstart = commands(blocks("bash")[0])
    assert quickstart == ["make demo", "make test"]
    for target, runs in (("demo", "-m rest.cli demo"), ("test", "-m pytest")):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        assert runs in dry.stdout
    done = subprocess.run([sys.executable, "-m", "rest.cli", "demo", "--help"], capture_output=True, text=True,
                          timeout=120, env=environment(shims))  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_every_readme_command_runs(workdir, stand_ins, shims):
    env = environment(shims)
    server = None
    ran = []
    try:
        for block in blocks("bash")[1:]:
            for command in commands(block):
                command = substitute(command, stand_ins)
                if command.startswith("retriever-server "):
                    # Loopback only, on a free port; the generate commands use its address.
                    command = command.replace("--host 0.0.0.0", "--host 127.0.0.1").replace("--port 50051",
                                                                                           "--port 0")
                    server = subprocess.Popen(shlex.split(command), cwd=workdir, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True)  # fmt: skip
                    line = server.stdout.readline()
                    match = re.search(r"listening on (\S+)", line)
                    assert match, (line, server.stderr.read() if server.poll() is not None else "")
                    stand_ins = stand_ins | {SERVER_ADDRESS: match.group(1)}
                    ran.append(command)
                    continue
                stdin = None
                if command.startswith("rest chat "):
                    stdin = "w5 w6\n/exit\n"
                if command.startswith("rest bench "):
                    command += " --limit 1 --max-new-tokens 8 --settings greedy --out bench-out"
                done = subprocess.run(command, shell=True, cwd=workdir, env=env, input=stdin, capture_output=True,
                                      text=True, timeout=600)  # fmt: skip
                assert done.returncode == 0, f"README command failed: {command}\n{done.stderr}"
                ran.append(command)
    finally:
        if server is not None:
            server.kill()
            server.wait(10)
    assert any(c.startswith("rest generate") and "--retriever 127.0.0.1:" in c for c in ran)
    assert sum(c.startswith("rest ") for c in ran) >= 9
    built = json.loads(subprocess.run(["rest", "datastore", "info", "ds/mine", "--json"], cwd=workdir, env=env,
                                      capture_output=True, text=True, timeout=120).stdout)  # fmt: skip
    assert built["info"]["n_docs"] == 10  # the folder's *.py files, without tests/ and the bytecode


def test_readme_python_code_runs(workdir, stand_ins, shims):
    (code,) = blocks("python")
    code = substitute(code, stand_ins).replace('device="cuda"', 'device="cpu"')
    here = workdir / "python"  # its own folder: the shell commands build ds/mine too
    shutil.copytree(workdir / "my-project", here / "my-project")
    script = here / "readme_example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=here, env=environment(shims), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (here / "ds" / "mine" / "manifest.json").exists()
