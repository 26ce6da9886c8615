"""What the background scrub costs: its throughput, and its effect on search latency.

    python bench/scrub.py [--tokens 20000000] [--json bench/out/scrub.json]

Workload (fixed, seeded): a synthetic datastore of ``--tokens`` token positions (vocabulary
16,384, Zipf-distributed ids with recurring phrases, documents of 200-2,000 tokens), so 6 bytes
per position (2-byte tokens, 4-byte suffix-array entries), one shard; exact searches with
default ``SearchParams`` of contexts cut from the documents (the last 32 tokens before a seeded
random position).

Rows, each measured in the same run:
- throughput: one unlimited scrub pass over the datastore (the page cache is warm: the build
  just wrote it), bytes per second, and the scrub thread's CPU time per MiB;
- search latency in-process, one search at a time, p50 and p99 over ``--searches`` searches per
  row, with no scrub and with scrubs at 8 MiB/s (the server's default), 64 MiB/s and unlimited
  running beside it. The rows take turns in blocks of 100 searches, each block with a fresh
  scrub, so that they share the machine's moments of load; the ratio is against "no scrub".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import library_versions  # noqa: E402
from rest.datastore import Datastore, build_datastore_from_array  # noqa: E402
from rest.types import SearchParams  # noqa: E402

MiB = 1 << 20
VOCAB = 16384
CONTEXT_TOKENS = 32
BLOCK = 100
RATES = {"no scrub": None, "scrub 8 MiB/s": 8 * MiB, "scrub 64 MiB/s": 64 * MiB,
         "scrub unlimited": 0}


def synthetic_corpus(n_tokens: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Token ids laid end to end and the document lengths (separators not counted)."""
    rng = np.random.default_rng(seed)
    phrases = [rng.zipf(1.3, size=rng.integers(4, 24)) % VOCAB for _ in range(500)]
    parts, lengths, total = [], [], 0
    while total < n_tokens:
        length = int(rng.integers(200, 2000))
        doc = rng.zipf(1.3, size=length) % VOCAB
        for _ in range(length // 50):  # recurring phrases: long matches exist
            phrase = phrases[rng.integers(len(phrases))]
            at = int(rng.integers(0, max(1, length - len(phrase))))
            doc[at:at + len(phrase)] = phrase[: length - at]
        parts.append(doc)
        lengths.append(length)
        total += length + 1
    return np.concatenate(parts).astype(np.uint32), lengths


def contexts_from(tokens: np.ndarray, lengths: list[int], n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ends = np.cumsum(lengths)
    out = []
    for _ in range(n):
        d = int(rng.integers(len(lengths)))
        start = int(ends[d] - lengths[d])
        end = start + int(rng.integers(1, lengths[d] + 1))
        out.append(tokens[max(start, end - CONTEXT_TOKENS):end].tolist())
    return out


def throughput(ds: Datastore) -> dict:
    """One unlimited pass: bytes/s, and CPU seconds per MiB (the scrub thread's, by the
    process's CPU clock while nothing else runs in it)."""
    cpu, wall = time.process_time(), time.perf_counter()
    scrub = ds.start_scrub(0, pause_s=3600)
    while scrub.passes < 1:
        time.sleep(0.005)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    read = scrub.bytes_read
    scrub.stop()
    return {"bytes": read, "seconds": wall, "mib_per_s": read / MiB / wall,
            "cpu_ms_per_mib": 1000 * cpu / (read / MiB)}


def latencies(ds: Datastore, contexts: list[list[int]], n: int) -> dict[str, list[float]]:
    params = SearchParams()
    out: dict[str, list[float]] = {row: [] for row in RATES}
    at = 0
    while min(len(v) for v in out.values()) < n:
        for row, rate in RATES.items():
            scrub = ds.start_scrub(rate, pause_s=0) if rate is not None else None
            time.sleep(0.01)  # the scrub is reading
            for _ in range(BLOCK):
                context = contexts[at % len(contexts)]
                at += 1
                started = time.perf_counter()
                ds.search(context, params)
                out[row].append(time.perf_counter() - started)
            if scrub is not None:
                scrub.stop()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--searches", type=int, default=2000, help="per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tokens, lengths = synthetic_corpus(args.tokens, args.seed)
        build_datastore_from_array(Path(tmp) / "ds", tokens, lengths, vocab_size=VOCAB,
                                   tokenizer_name="synthetic", tokenizer_fingerprint="synthetic")
        # Leases and inotify play no part in what is measured.
        ds = Datastore.open(Path(tmp) / "ds", leases=False, inotify=False)
        contexts = contexts_from(tokens, lengths, 1000, args.seed + 1)
        speed = throughput(ds)
        timed = latencies(ds, contexts, args.searches)
        size = sum(Path(tmp, "ds", f"{s}.rds").stat().st_size for s in ds.shard_names)

    base = {q: float(np.percentile(timed["no scrub"], q)) for q in (50, 99)}
    rows = []
    for row, values in timed.items():
        p50, p99 = (float(np.percentile(values, q)) for q in (50, 99))
        rows.append({"row": row, "p50_us": p50 * 1e6, "p99_us": p99 * 1e6,
                     "p50_ratio": p50 / base[50], "p99_ratio": p99 / base[99], "n": len(values)})
    print(f"datastore: {args.tokens:,} token positions, {size / MiB:.1f} MiB on disk")
    print(f"scrub throughput (one unlimited pass, warm page cache): {speed['mib_per_s']:.0f} MiB/s,"
          f" {speed['cpu_ms_per_mib']:.2f} ms of CPU per MiB")
    print(f"{'search latency':<18} {'p50 us':>9} {'p99 us':>9} {'p50 x':>7} {'p99 x':>7}")
    for r in rows:
        print(f"{r['row']:<18} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['p50_ratio']:>7.2f}"
              f" {r['p99_ratio']:>7.2f}")
    report = {"tokens": args.tokens, "bytes_on_disk": size, "throughput": speed,
              "latency": rows, "versions": library_versions()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
