"""deploy/images/: the Dockerfiles pass hadolint, run as a numeric non-root user, start the
programs pyproject installs with arguments those programs accept, and install an extra that has
what the program needs. (No image builder runs on the CI machine, and no registry is reachable
from it, so the images themselves are built elsewhere: deploy/README.md.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

from tests.deploy.programs import PYPROJECT, command_of, parse, resolve
from tests.deploy.test_consistency import DOCKERFILES, dockerfile_entrypoint

HADOLINT_CONFIG = DOCKERFILES["retriever"].parent / "hadolint.yaml"


def instructions(path, name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in path.read_text().splitlines()
            if line.startswith(name + " ")]  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_passes(kind):
    done = subprocess.run(["hadolint", "--config", str(HADOLINT_CONFIG), str(DOCKERFILES[kind])],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_a_numeric_non_root_user_with_a_builder_stage(kind):
    path = DOCKERFILES[kind]
    user = instructions(path, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{path.name}: USER must be numeric and not root"
    stages = instructions(path, "FROM")
    assert len(stages) >= 2 and any(" AS " in s for s in stages), "a builder stage"
    assert "maturin build" in path.read_text(), "the wheel is built in the image build"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_default_command_parses_with_the_program(kind):
    path = DOCKERFILES[kind]
    (program,) = dockerfile_entrypoint(path)
    (cmd,) = instructions(path, "CMD")
    command, args = resolve(command_of(program), json.loads(cmd))
    parse(command, args)


def test_the_extras_the_images_install_exist_and_the_retriever_one_has_no_torch():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert "[datastore]" in DOCKERFILES["retriever"].read_text()
    assert "[decoder]" in DOCKERFILES["decoder"].read_text()
    everything = project["dependencies"] + extras["datastore"]
    assert not any(dep.startswith("torch") for dep in everything)
    decoder = " ".join(extras["decoder"])
    assert "torch" in decoder


RETRIEVER_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch now fails, as in the slim retriever image
from click.testing import CliRunner
from rest.datastore import build_datastore
from rest.types import SearchParams
from retriever_service.client import RemoteRetriever
from retriever_service.server import BackgroundServer, ServerConfig
out = sys.argv[1]
build_datastore(out, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 9]], vocab_size=16, tokenizer_name="t",
                tokenizer_fingerprint="f")
with BackgroundServer(ServerConfig(datastore=out, port=0)) as server:
    with RemoteRetriever(f"127.0.0.1:{server.port}") as retriever:
        retriever.info()
        with retriever.session() as session:
            result = session.search([1, 2, 3], SearchParams(min_span=1))
assert result is not None and result.match_length == 3, result
from rest.cli import cli
assert CliRunner().invoke(cli, ["datastore", "info", out]).exit_code == 0
print("served without torch")
"""


def test_the_retrieval_service_runs_without_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", RETRIEVER_WITHOUT_TORCH, str(tmp_path / "ds")],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode == 0 and "served without torch" in done.stdout, done.stderr[-3000:]
