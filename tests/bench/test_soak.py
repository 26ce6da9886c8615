"""bench/soak.py at a small size: decoding sessions against retriever servers that are killed
and started again; every output equals plain decoding. Two minutes in CI, as a soak should run
for a while; ``REST_SOAK_SECONDS`` sets another length."""

from __future__ import annotations

import io
import os

from bench.soak import run_soak
from tests.decoder.helpers import make_model, make_tokenizer

SECONDS = float(os.environ.get("REST_SOAK_SECONDS", "120"))


def test_sessions_survive_servers_that_restart_with_outputs_unchanged(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = io.StringIO()
    report = run_soak(str(model_dir), tmp_path, seconds=SECONDS, sessions=3, servers=2,
                      restart_every_s=1.0, down_s=0.3, max_new_tokens=24, n_prompts=6,
                      budget=16, deadline_s=0.05, seed=0, threads=1, out=out)
    assert report["crashes"] == []
    assert report["differing"] == []
    assert report["generations"] >= 3 and report["identical_to_plain"] == report["generations"]
    assert sum(report["restarts"].values()) >= 2 and "all at once" in report["restarts"]
    assert report["server_starts"] >= 2 + 2
    assert 0 < report["searches_answered"] <= report["searches"]
    assert report["M"] > 1.0  # drafts from the servers were accepted between outages
    assert report["search_p99_ms"] >= report["search_p50_ms"] > 0
    assert "errors: search without an answer" in out.getvalue()
