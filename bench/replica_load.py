"""Load on replicated shard servers: many decoder-like sessions, one replica killed halfway.

    python -m bench.replica_load [--shards 2] [--replicas 2] [--sessions 16] [--seconds 20]
                                 [--json bench/out/replica_load.json]

Workload (fixed): the reference workload of shared/bench/humaneval-replay.md (the standard
library's sources, 16k byte-level BPE, cached under bench/out/cache/ by bench/service_latency.py),
built into ``--shards`` shards. Each session replays HumanEval targets as a decoder would: every
step sends the last 32 tokens with the decoder's search (``DecodingConfig().search``: exact, spans
1..16, budget 64, depth 10) and 3 back-off levels in one ``search_levels`` call, then moves on by
1 to 4 tokens (seeded: accepted drafts), after ``--think-ms`` of "verification". ``--tiny`` uses
small random documents instead (for the test that runs this script).

Pool: ``--shards`` x ``--replicas`` ``retriever-server`` subprocesses on loopback. Client: one
``RemoteRetriever`` (one decoder process) with ``--sessions`` sessions in threads. Phases: all
replicas up, then (at ``--kill-at`` of the run) replica 0 of shard set 0 killed with SIGKILL.
Per phase: steps/s, p50/p99 step latency, steps without an answer ("no draft"), partial answers,
hedges and failovers. Baseline in the same run: the same sessions against the whole datastore
in-process (``LocalRetriever``). Also from a sample of steps: bytes on the wire per step and
shard, and how often the merge of the shards' answers is certified exact (``merge.py``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import finish_run  # noqa: E402
from decoder.config import DecodingConfig  # noqa: E402
from rest.retriever import LocalRetriever  # noqa: E402
from retriever_service import wire  # noqa: E402
from retriever_service.client import RemoteRetriever  # noqa: E402
from retriever_service.merge import merge_with_bounds  # noqa: E402

PARAMS = DecodingConfig().search
LEVELS = 3
CONTEXT_TOKENS = 32


def workload(out_dir: Path, shards: int, tiny: bool):
    """(datastore path, shard names, targets to replay)."""
    from rest.datastore import Datastore, build_datastore

    if tiny:
        rng = np.random.default_rng(0)
        phrases = [rng.integers(0, 40, size=8).tolist() for _ in range(20)]
        docs = [sum((phrases[i] for i in rng.integers(0, 20, size=30)), []) for _ in range(60)]
        targets = docs[:20]
        vocab, name = 64, "tiny"
    else:
        from bench.service_latency import reference_corpus

        docs, targets = reference_corpus(ROOT / "bench/out/cache")
        vocab, name = 16384, "stdlib-bpe16384"
    total = sum(len(d) for d in docs)
    path = out_dir / "ds"
    build_datastore(path, docs, vocab_size=vocab, tokenizer_name=name, tokenizer_fingerprint=name,
                    shard_tokens=total // shards + 1)
    return path, Datastore.open(path).shard_names, targets


def start_server(path: Path, shards: list[str]):
    from bench.service_latency import start_process

    args = ["-m", "retriever_service.server", "--datastore", str(path), "--port", "0",
            "--log-level", "ERROR", "--grace-s", "0", "--max-concurrent-searches", "256"]
    for shard in shards:
        args += ["--shard", shard]
    return start_process(args)


class Sessions:
    """``count`` decoder-like sessions on ``retriever``, each step timed and its phase noted."""

    def __init__(self, retriever, targets, count: int, think_s: float, seed: int) -> None:
        self.retriever = retriever
        self.targets = [t for t in targets if len(t) > 8]
        self.count = count
        self.think_s = think_s
        self.seed = seed
        self.phase = "all up"
        self.samples: list[tuple[str, float, bool]] = []  # (phase, latency, answered)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _run(self, number: int) -> None:
        rng = random.Random(self.seed * 1000 + number)
        session = self.retriever.session()
        mine = []
        while not self._stop.is_set():
            target = self.targets[rng.randrange(len(self.targets))]
            k = rng.randrange(1, len(target) // 2)
            while k < len(target) and not self._stop.is_set():
                context = target[max(0, k - CONTEXT_TOKENS):k]
                phase = self.phase
                started = time.perf_counter()
                levels = session.search_levels(context, PARAMS, LEVELS)
                mine.append((phase, time.perf_counter() - started, levels is not None))
                k += rng.randint(1, 4)
                if self.think_s:
                    time.sleep(self.think_s)
        session.close()
        with self._lock:
            self.samples += mine

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.count)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def summarize(samples, phase: str, seconds: float) -> dict:
    rows = [(latency, answered) for p, latency, answered in samples if p == phase]
    latencies = np.array([latency for latency, _ in rows]) if rows else np.zeros(1)
    return {
        "steps": len(rows),
        "steps_per_s": len(rows) / seconds if seconds else 0.0,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "no_draft": sum(1 for _, answered in rows if not answered),
    }


def shard_counters(stats: dict) -> dict:
    out = {"hedges": 0, "failovers": 0, "missed": 0}
    for shard in stats["shards"].values():
        for key in out:
            out[key] += shard[key]
    return out


def wire_sample(path: Path, shard_names, targets, n: int, seed: int) -> dict:
    """Bytes per step on the wire (request, and the answers of every shard server), and how
    often the merge of the shards' answers is certified exact, on ``n`` replayed steps."""
    from rest.datastore import Datastore

    datastore = Datastore.open(path)
    rng = random.Random(seed)
    request_bytes, response_bytes, certified, identical = [], [], 0, 0
    targets = [t for t in targets if len(t) > 8]
    for _ in range(n):
        target = targets[rng.randrange(len(targets))]
        k = rng.randrange(1, len(target))
        context = target[max(0, k - CONTEXT_TOKENS):k]
        request_bytes.append(wire.search_request(context, PARAMS, levels=LEVELS).ByteSize())
        answers = [datastore.search(context, PARAMS, shards=[s]) for s in shard_names]
        unpruned = [datastore.search(context, replace(PARAMS, budget=4096), shards=[s])
                    for s in shard_names]
        answers = [with_cut(a, u) for a, u in zip(answers, unpruned)]
        response_bytes.append(sum(wire.search_response(a).ByteSize() for a in answers))
        merged = merge_with_bounds(answers, PARAMS.budget)
        whole = datastore.search(context, PARAMS)
        certified += merged.exact
        identical += (merged.result.tokens, merged.result.parents, merged.result.counts) == (
            whole.tokens, whole.parents, whole.counts)
    return {
        "request_bytes_per_step": float(np.mean(request_bytes)),
        # First level only here, so times the levels for what a step receives.
        "response_bytes_per_level_all_shards": float(np.mean(response_bytes)),
        "merge_certified_exact": certified / n,
        "merge_identical_to_whole": identical / n,
    }


def sample_latencies(retriever, seconds: float) -> list[float]:
    """Every answer latency the client measured over ``seconds`` (its shards' recent-latency
    windows, read often enough that none is missed)."""
    seen: dict[int, int] = {}
    samples: list[float] = []
    until = time.monotonic() + seconds
    while True:
        for group in retriever._pool.routing():
            window = group.stats.latencies
            total, values = window.total, window.values()
            new = min(total - seen.get(id(window), 0), len(values))
            samples += values[len(values) - new:] if new else []
            seen[id(window)] = total
        if time.monotonic() >= until:
            return samples
        time.sleep(min(0.05, max(0.0, until - time.monotonic())))


def fan_out_tail(samples: list[float], seed: int, draws: int = 20000) -> dict:
    """Step latency of a fan-out to N shard sets, from this run's answer latencies of one shard
    set (each an independent draw): p50/p99 of the slowest of N, without hedging and with a
    hedge at the shards' p95 (A6: the first answer of the search and of its hedge, sent p95
    later to another replica)."""
    rng = np.random.default_rng(seed)
    latencies = np.array(samples)
    hedge_at = float(np.percentile(latencies, 95))
    out = {"samples": len(samples), "hedge_delay_ms": hedge_at * 1e3, "by_n": {}}
    for n in (1, 5, 25, 100, 250):
        first = rng.choice(latencies, size=(draws, n))
        second = rng.choice(latencies, size=(draws, n)) + hedge_at
        plain, hedged = first.max(axis=1), np.minimum(first, second).max(axis=1)
        out["by_n"][n] = {
            "p50_ms": float(np.percentile(plain, 50) * 1e3),
            "p99_ms": float(np.percentile(plain, 99) * 1e3),
            "hedged_p50_ms": float(np.percentile(hedged, 50) * 1e3),
            "hedged_p99_ms": float(np.percentile(hedged, 99) * 1e3),
        }
    return out


def with_cut(pruned, unpruned):
    kept = set(pruned.paths())
    cut = max((c for p, c in zip(unpruned.paths(), unpruned.counts) if p not in kept), default=0)
    return replace(pruned, cut_count=pruned.cut_count or cut)


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="replica-load-"))
    print("building the datastore...", flush=True)
    path, shard_names, targets = workload(workdir, args.shards, args.tiny)
    groups = [shard_names[i::args.shards] for i in range(args.shards)]
    servers = {(i, j): start_server(path, group)
               for i, group in enumerate(groups) for j in range(args.replicas)}
    results: dict = {"shards": len(shard_names), "sets": groups, "replicas": args.replicas,
                     "sessions": args.sessions, "seconds": args.seconds}
    try:
        retriever = RemoteRetriever([address for _, address in servers.values()],
                                    deadline_s=args.deadline)
        info = retriever.info()
        assert len(info.shards) == len(shard_names), info
        half = args.seconds * args.kill_at
        sessions = Sessions(retriever, targets, args.sessions, args.think_ms / 1000, args.seed)
        print(f"{args.sessions} sessions for {args.seconds} s...", flush=True)
        sessions.start()
        per_shard = sample_latencies(retriever, half)
        before = shard_counters(retriever.stats())
        victim, _ = servers[0, 0]
        victim.kill()
        sessions.phase = "one replica killed"
        time.sleep(args.seconds - half)
        sessions.stop()
        after = shard_counters(retriever.stats())
        results["phases"] = {
            "all up": {**summarize(sessions.samples, "all up", half), **before},
            "one replica killed": {
                **summarize(sessions.samples, "one replica killed", args.seconds - half),
                **{k: after[k] - before[k] for k in after}},
        }
        results["client"] = retriever.stats()
        results["fan_out"] = fan_out_tail(per_shard, args.seed)
        retriever.close()

        print("baseline: the same sessions in-process...", flush=True)
        local = LocalRetriever(str(path))
        baseline = Sessions(local, targets, args.sessions, args.think_ms / 1000, args.seed)
        baseline.phase = "in-process"
        baseline.start()
        time.sleep(half)
        baseline.stop()
        results["phases"]["in-process (baseline)"] = summarize(baseline.samples, "in-process",
                                                               half)
        results["wire"] = wire_sample(path, shard_names, targets, args.wire_samples, args.seed)
    finally:
        for proc, _ in servers.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
    return results


def report(results: dict) -> str:
    lines = [f"{results['sessions']} sessions, {len(results['sets'])} shard sets x "
             f"{results['replicas']} replicas, {results['seconds']:g} s",
             "",
             "| phase | steps/s | p50 ms | p99 ms | no draft | hedges | failovers | shard misses |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["phases"].items():
        lines.append(
            f"| {name} | {row['steps_per_s']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['no_draft']} | {row.get('hedges', '')} | {row.get('failovers', '')} | "
            f"{row.get('missed', '')} |")
    w = results["wire"]
    lines += ["", f"request {w['request_bytes_per_step']:.0f} B/step; answers (first level, all "
              f"shards) {w['response_bytes_per_level_all_shards']:.0f} B; merge certified exact "
              f"{w['merge_certified_exact']:.0%}, identical to the whole datastore's tree "
              f"{w['merge_identical_to_whole']:.0%}"]
    fan = results.get("fan_out")
    if fan:
        lines += ["", f"fan-out to N shard sets (from {fan['samples']} answer latencies of this"
                  f" run; hedge at their p95, {fan['hedge_delay_ms']:.2f} ms):", "",
                  "| N | p50 ms | p99 ms | hedged p50 ms | hedged p99 ms |",
                  "|---:|---:|---:|---:|---:|"]
        for n, row in fan["by_n"].items():
            lines.append(f"| {n} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
                         f"{row['hedged_p50_ms']:.2f} | {row['hedged_p99_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=2, help="shard sets (one shard each)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the run")
    parser.add_argument("--think-ms", type=float, default=2.0,
                        help="a step's verification time between searches")
    parser.add_argument("--deadline", type=float, default=0.1)
    parser.add_argument("--wire-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="small random documents (tests)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/out/replica_load.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    command = " ".join(["python -m bench.replica_load", *(argv or sys.argv[1:])])
    return finish_run(run(args), command, args.json, load_before, report)


if __name__ == "__main__":
    main()
