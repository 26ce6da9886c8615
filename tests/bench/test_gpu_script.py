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
    from decoder.kv_cache import BatchedCache
    from decoder.model_support import profile_model
    from decoder.verify import RowTree, build_tree_batch, forward_tree_batch, prefill

    model = gpu.random_model("tiny", "cpu", torch.float32)
    profile = profile_model(model)
    kv = BatchedCache()
    with torch.inference_mode():
        kv.append(prefill(model, list(range(1, 20)))[0], 19)
        inputs = build_tree_batch([RowTree(20, [5, 6, 7], [-1, 0, 1])], [19], 19, profile,
                                  model.dtype, model.device)
        first = forward_tree_batch(model, profile, kv, inputs)
        kv.commit(19, [[]])
        assert kv.width == 19
        again = forward_tree_batch(model, profile, kv, inputs)
    torch.testing.assert_close(first, again)
