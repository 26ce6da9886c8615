"""bench/suite.py (``rest bench``) end to end on a tiny saved model and datastore."""

import json

import pytest
from click.testing import CliRunner

from bench import suite
from bench.suite import bench_command, summarise
from decoder.generator import RestGenerator
from rest.datastore import build_datastore
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer, prompts


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model, a datastore of its own greedy continuations and a prompts file."""
    tmp_path = tmp_path_factory.mktemp("suite")
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
    return model_dir, ds, prompts_file


def run_bench(saved, out, *extra):
    model_dir, ds, prompts_file = saved
    result = CliRunner().invoke(bench_command, [
        "--model", str(model_dir), "--datastore", str(ds), "--workload", "jsonl", "--prompts", str(prompts_file),
        "--limit", "2", "--max-new-tokens", "24", "--budget", "8", "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "bench-jsonl.json").read_text())


def test_every_method_runs_and_greedy_outputs_match_plain(saved, tmp_path):
    report = run_bench(saved, tmp_path / "out")
    greedy = report["results"]["greedy"]
    assert set(greedy) == {"plain", "rest-policy", "exact", "prompt-lookup", "hybrid", "hf-prompt-lookup"}
    for method, row in greedy.items():
        assert row["identical"] == 2, method  # lossless: every greedy method equals plain decoding
        assert row["tokens_per_s"] > 0
    assert greedy["exact"]["M"] > 1.0  # the datastore holds the model's own continuations
    assert set(report["results"]) == {"greedy", "sampled"}
    assert all(row["identical"] is None for row in report["results"]["sampled"].values())
    png = (tmp_path / "out" / "bench-jsonl.png").read_bytes()
    assert png[:4] == b"\x89PNG"


def test_the_report_says_what_ran_where(saved, tmp_path):
    report = run_bench(saved, tmp_path / "out", "--settings", "greedy", "--methods", "plain,hybrid")
    rows = report["rows"]["greedy"]
    assert [(r["prompt"], r["method"]) for r in rows] == [(0, "plain"), (0, "hybrid"), (1, "plain"), (1, "hybrid")]
    for r in rows:
        assert r["new_tokens"] == 24 and r["steps"] >= 1 and r["identical"] is True
    hybrid = report["results"]["greedy"]["hybrid"]
    assert hybrid["tokens"] == sum(r["new_tokens"] for r in rows if r["method"] == "hybrid")
    assert report["datastore"]["n_tokens"] > 0 and report["datastore"]["path"] == str(saved[1])
    assert report["libraries"]["torch"] and report["libraries"]["transformers"] and report["libraries"]["python"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["settings"]["methods"] == ["plain", "hybrid"]
    assert report["settings"]["decoder_configs"]["hybrid"]["budget"] == 8


def test_every_pass_starts_with_fresh_generators(saved, tmp_path, monkeypatch):
    """The sampled pass must not draft from what the greedy pass served: each (method, pass) has
    its own generator, whose served outputs are empty when its first prompt starts."""
    calls = []
    original = RestGenerator.generate

    def recording(self, prompt, *args, **kwargs):
        served = self.served.tokens if self.served is not None else None
        calls.append((id(self), kwargs.get("temperature"), served))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(RestGenerator, "generate", recording)
    run_bench(saved, tmp_path / "out", "--methods", "plain,hybrid")
    calls = calls[1:]  # the warm-up
    greedy = [c for c in calls if c[1] == 0.0]
    sampled = [c for c in calls if c[1] != 0.0]
    assert len(greedy) == len(sampled) == 4  # 2 prompts x (plain, hybrid)
    assert not {c[0] for c in greedy} & {c[0] for c in sampled}
    first_hybrid = {pass_[1][2] for pass_ in (greedy, sampled)}  # prompt 0, hybrid, each pass
    assert first_hybrid == {0}
    assert greedy[3][2] > 0  # within a pass, later prompts do draft from earlier outputs


def test_identical_means_every_token_not_a_prefix():
    rows = [{"new_tokens": 3, "steps": 2, "seconds": 1.0, "retrieval_s": 0.0, "identical": True},
            {"new_tokens": 2, "steps": 1, "seconds": 1.0, "retrieval_s": 0.0, "identical": False}]
    summary = summarise(rows)
    assert (summary["identical"], summary["tokens"], summary["M"]) == (1, 5, pytest.approx(5 / 3))
    assert summary["tokens_per_s"] == pytest.approx(2.5)


def test_an_output_that_extends_plain_decoding_is_not_identical(saved, tmp_path, monkeypatch):
    """Plain decoding stops after 20 tokens here; the drafted methods give those 20 and 4 more,
    which a prefix comparison would call identical."""
    original = RestGenerator.generate

    def plain_stops_early(self, prompt, *args, plain=False, **kwargs):
        result = original(self, prompt, *args, plain=plain, **kwargs)
        if plain:
            result.tokens[:] = result.tokens[:20]
        return result

    monkeypatch.setattr(RestGenerator, "generate", plain_stops_early)
    report = run_bench(saved, tmp_path / "out", "--settings", "greedy", "--methods", "plain,exact")
    greedy = report["results"]["greedy"]
    assert greedy["plain"]["identical"] == 2
    assert greedy["exact"]["identical"] == 0
    assert [r["new_tokens"] for r in report["rows"]["greedy"]] == [20, 24, 20, 24]


def test_chart_has_a_panel_per_figure(tmp_path):
    report = {"model": "/m/tiny", "workload": "jsonl", "prompts": 1, "budget": 4,
              "machine": {"cpu": "cpu", "cores": 2, "gpu": None},
              "results": {"greedy": {"plain": {"speedup": 1.0, "M": 1.0, "tokens_per_s": 10.0},
                                     "hybrid": {"speedup": 2.0, "M": 3.0, "tokens_per_s": 20.0}}}}
    suite.chart(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert [key for key, _, _ in suite.CHART_PANELS] == ["speedup", "M", "tokens_per_s"]
