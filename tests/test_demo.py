"""`rest demo`, the README's first command, end to end with a toy model: the datastore built from
the standard library with the model's tokenizer, `retriever-server` as a separate process, REST
against plain decoding, and the results written. (The real demo model trains for minutes.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from rest.demo import demo_command  # noqa: E402
from rest.demo_model import train_demo_model  # noqa: E402
from tests.test_demo_model import TINY, documents  # noqa: E402,F401 - the fixture


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory, documents) -> Path:  # noqa: F811
    return train_demo_model(tmp_path_factory.mktemp("demo") / "model", documents=documents,
                            seed=0, progress=False, **TINY)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Where the demo caches its datastore: built by the first test, reused by the second."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("budget", ["auto", "4"])
def test_demo_end_to_end_gives_identical_outputs_and_writes_results(
    toy_model, cache_dir, tmp_path, monkeypatch, budget
):
    monkeypatch.setenv("REST_CACHE_DIR", str(cache_dir))
    out = tmp_path / "results"
    result = CliRunner().invoke(demo_command, [
        "--model", str(toy_model), "--problems", "2", "--max-new-tokens", "12",
        "--budget", budget, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "retriever-server (pid" in result.output  # a separate process served the datastore
    report = json.loads((out / "demo.json").read_text())
    summary = report["summary"]
    assert summary["identical"] == summary["prompts"] == 2
    assert summary["retrieval_failures"] == 0
    assert summary["budget"] == budget and summary["device"] == "cpu"
    assert [r["task_id"] for r in report["rows"]] == ["HumanEval/0", "HumanEval/1"]
    assert (out / "demo.png").stat().st_size > 0
    assert len(list(cache_dir.glob("datastore-stdlib-*"))) == 1

