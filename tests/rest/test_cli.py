"""rest/cli.py datastore commands, end to end with a tokenizer saved in a local directory."""

import json

from click.testing import CliRunner
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from rest.cli import main

CODE = ["def add(a, b):\n    return a + b\n", "def mul(a, b):\n    return a * b\n"] * 20


def tokenizer_dir(tmp_path):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CODE, vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    return out


def test_build_info_query_verify(tmp_path):
    tok = tokenizer_dir(tmp_path)
    src = tmp_path / "code.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE))
    runner = CliRunner()
    ds = tmp_path / "ds"
    r = runner.invoke(main, ["datastore", "build", "--tokenizer", str(tok), "--input", str(src), "--out", str(ds)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["datastore", "info", str(ds)])
    assert r.exit_code == 0 and json.loads(r.output)["info"]["n_docs"] == 40
    r = runner.invoke(main, ["datastore", "verify", str(ds)])
    assert r.exit_code == 0 and r.output.startswith("ok:")
    r = runner.invoke(main, ["datastore", "query", str(ds), "--text", "def add(a, b):\n    return", "--tokenizer", str(tok)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["match_length"] >= 2 and out["occurrences"] == 20
    assert out["paths"][0] == " a"  # the most frequent continuation comes first
    r = runner.invoke(main, ["datastore", "query", str(ds), "--tokens", "1,x"])
    assert r.exit_code != 0 and "comma-separated integers" in r.output


def test_build_refuses_missing_inputs(tmp_path):
    r = CliRunner().invoke(main, ["datastore", "build", "--tokenizer", "x", "--out", str(tmp_path / "ds")])
    assert r.exit_code != 0 and "give input files" in r.output
