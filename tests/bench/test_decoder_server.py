"""bench/decoder_server.py at a tiny size (a tiny model, two levels, a few tokens), run the way
bench/gpu.py runs it on a GPU (its part 3), here on the CPU."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bench import gpu
from tests.decoder.helpers import make_model
from tests.decoder.server.server_testing import tokenizer_with_template


def test_the_benchmark_runs_both_modes_at_every_level(tmp_path, capfd) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    tokenizer_with_template().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([f"w{i} w{i + 3} w{i + 1} w{i + 3}" for i in range(5, 10)]))
    bench_args = [
        "--model", str(model_dir), "--datastore", "none", "--concurrency", "1,2", "--prompts",
        "2", "--prompts-file", str(prompts), "--max-tokens", "6", "--max-batch", "2",
        "--budget", "8", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(gpu.main, [
        "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--contexts", "8",
        "--sizes", "1,2", "--repeats", "1", "--no-demo", "--out", str(tmp_path / "out"),
        *(f"--server-arg={a}" for a in bench_args)], catch_exceptions=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out" / "decoder_server.json").read_text())["rows"]
    assert [(r["concurrency"], r["mode"]) for r in rows] == [
        (1, "plain"), (1, "rest"), (2, "plain"), (2, "rest")]
    for r in rows:
        assert r["same"] and r["requests"] == 2 and 0 < r["tokens"] <= 12
        assert r["tokens_per_s"] > 0 and r["p90_latency_s"] >= r["p50_latency_s"] > 0
    plain = [r for r in rows if r["mode"] == "plain"]
    assert all(r["M"] == 1.0 and r["speedup"] == 1.0 and r["acceptance"] == 0 for r in plain)
    assert "| 2 | rest |" in capfd.readouterr().out
