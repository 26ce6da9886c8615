"""bench/decoder_precision.py, at a tiny size: float32 is always identical, and so is a plain
step in bfloat16 (it is generate's own computation)."""

import json

from click.testing import CliRunner

from bench import decoder_precision
from tests.decoder.helpers import make_model, make_tokenizer


def test_identity_table_at_a_tiny_size(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "precision.json"
    result = CliRunner().invoke(decoder_precision.main, [
        "--model", str(model_dir), "--prompts", "2", "--max-new-tokens", "12",
        "--dtypes", "float32,bfloat16", "--budgets", "0,4", "--threads", "1",
        "--json", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["mode"]) for r in rows] == [
        (d, m) for d in ("float32", "bfloat16") for m in ("plain", "budget=4", "reproducible")]
    assert all(r["identical_share"] == 1.0 for r in rows if r["dtype"] == "float32")
    assert next(r for r in rows if r["dtype"] == "bfloat16" and r["mode"] == "plain")[
        "identical_share"] == 1.0
    assert next(r for r in rows if r["mode"] == "reproducible")["repeat_same"] == "2/2"
    assert "| bfloat16 | budget=4" in result.output
