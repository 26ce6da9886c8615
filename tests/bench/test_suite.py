"""bench/suite.py (``rest bench``) end to end on a tiny saved model and datastore."""

import json

from click.testing import CliRunner

from bench.suite import bench_command
from rest.datastore import build_datastore
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer, prompts


def test_every_method_runs_and_greedy_outputs_match_plain(tmp_path):
    model, tokenizer = make_model("llama"), make_tokenizer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ids = prompts(2, seed=5)
    texts = [" ".join(f"w{i}" if i >= 3 else "<unk>" for i in p) for p in ids]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    docs = [e + hf_greedy(model, e, 24) for e in encoded]
    ds = tmp_path / "ds"
    build_datastore(ds, docs, vocab_size=VOCAB, tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    result = CliRunner().invoke(bench_command, [
        "--model", str(model_dir), "--datastore", str(ds), "--workload", "jsonl", "--prompts", str(prompts_file),
        "--limit", "2", "--max-new-tokens", "24", "--budget", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench-jsonl.json").read_text())
    greedy = report["results"]["greedy"]
    assert set(greedy) == {"plain", "rest-policy", "exact", "prompt-lookup", "hybrid", "hf-prompt-lookup"}
    for method, row in greedy.items():
        assert row["identical"] == 2, method  # lossless: every greedy method equals plain decoding
    assert greedy["exact"]["M"] > 1.0  # the datastore holds the model's own continuations
    assert set(report["results"]) == {"greedy", "sampled"}
    assert (out / "bench-jsonl.png").stat().st_size > 0
