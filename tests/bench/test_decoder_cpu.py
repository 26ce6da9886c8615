"""bench/decoder_cpu.py at a tiny size: every mode decodes every prompt, drafts from the oracle
retriever are accepted, and every mode's output equals plain decoding's."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bench import decoder_cpu
from tests.decoder.helpers import make_model
from tests.decoder.server.server_testing import tokenizer_with_template


def test_every_mode_decodes_every_prompt_with_the_plain_output(tmp_path) -> None:
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    tokenizer_with_template().save_pretrained(model_dir)
    out = tmp_path / "cpu.json"
    result = CliRunner().invoke(decoder_cpu.main, [
        "--model", str(model_dir), "--oracle", "--budgets", "4", "--prompts", "2",
        "--max-new-tokens", "12", "--threads", "1", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "rest budget=4", "rest budget=auto"}
    assert all(r["tokens"] == rows["plain"]["tokens"] > 0 and r["same_output"] for r in rows.values())
    assert rows["plain"]["M"] == 1.0
    assert rows["rest budget=4"]["M"] > 1.0  # the oracle holds the very continuation
    assert "rest budget=4" in result.output  # the table
