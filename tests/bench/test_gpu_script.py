"""bench/gpu.py, checked on the CPU with a toy model (the real run needs a GPU)."""

import json

import torch
from click.testing import CliRunner

from bench import gpu


def test_verification_cost_runs_every_size_and_leaves_the_cache_as_it_was(tmp_path):
    result = CliRunner().invoke(gpu.main, [
        "--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--contexts", "16,40",
        "--sizes", "1,3,8", "--repeats", "2", "--no-demo", "--no-server-bench", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "verification.json").read_text())
    assert data["device"] == "cpu" and data["shape"] == "tiny"
    for context_len in ("16", "40"):
        rows = data["contexts"][context_len]
        assert [r["tree_tokens"] for r in rows] == [1, 3, 8]
        assert rows[0]["vs_one_token"] == 1.0
        assert all(r["median_ms"] > 0 for r in rows)
    assert (tmp_path / "verification.png").stat().st_size > 0
    assert "| 40 | 8 |" in result.output


def test_a_timed_pass_gives_the_logits_of_a_fresh_cache():
    """The trim after each pass must leave the cache as the prefill left it: a later pass then
    gives the same logits as the first one."""
    from decoder.draft_tree import DraftTree
    from decoder.kv_cache import cache_length, keep_accepted, new_cache
    from decoder.verify import prefill, verify_tree

    model = gpu.random_model("tiny", "cpu", torch.float32)
    cache = new_cache()
    prefill(model, cache, list(range(1, 20)))
    inputs = DraftTree([5, 6, 7], [-1, 0, 1], [1.0] * 3).linearise(20, 19, model.dtype, model.device)
    with torch.inference_mode():
        first = verify_tree(model, cache, inputs)
        keep_accepted(cache, 19, [])
        assert cache_length(cache) == 19
        again = verify_tree(model, cache, inputs)
    torch.testing.assert_close(first, again)
