"""Ordinary searches after expensive calls that were abandoned: does the server recover at once?

    python bench/abandoned_searches.py [--calls 64] [--json bench/out/abandoned_searches.json]

Workload (fixed, seeded): one datastore holding random documents over a vocabulary of 60,000 ids
(for the ordinary searches: default ``SearchParams``, contexts cut from the documents) and 6,000
documents that start with [0, 0, 0] and go on with distinct tokens (for the expensive searches:
the REST policy at budget 4,096 and depth 256 on [0, 0], which counts 5,000 continuations through
distinct prefixes). A real ``retriever-server`` subprocess serves it with its caps for the REST
policy raised to those values (the default caps would refuse such a call outright: this measures
what happens to the calls a server does accept).

Rows, taking turns for ``--rounds`` rounds in the same run:
- idle: ``--searches`` ordinary searches, one at a time, on an idle server;
- after abandoned calls: ``--calls`` expensive calls sent at once with a ``--deadline-s``
  deadline; once every one of them has ended (DEADLINE_EXCEEDED), the same ordinary searches.
A server that ran abandoned searches to completion would keep its workers busy for calls x the
cost of one, and the first ordinary search would wait for them. The report gives p50 and p99,
the ratio to idle, the wait of the first ordinary search, and the server's CPU time per round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import library_versions  # noqa: E402
from rest.datastore import Datastore, build_datastore  # noqa: E402
from rest.types import SearchParams  # noqa: E402
from retriever_service import wire  # noqa: E402
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc  # noqa: E402

VOCAB = 60_000
EXPENSIVE = SearchParams(min_span=2, max_span=2, budget=4096, max_depth=256, policy="rest")
ORDINARY = SearchParams()


def build(out: Path, expensive_docs: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ordinary = [rng.integers(1, 200, size=int(rng.integers(100, 400))).tolist() for _ in range(400)]
    expensive = [[0, 0, 0, *rng.integers(1, VOCAB, size=258).tolist()] for _ in range(expensive_docs)]
    build_datastore(out, ordinary + expensive, vocab_size=VOCAB, tokenizer_name="synthetic",
                    tokenizer_fingerprint="synthetic")
    contexts = []
    for _ in range(500):
        doc = ordinary[rng.integers(len(ordinary))]
        end = int(rng.integers(1, len(doc) + 1))
        contexts.append(doc[max(0, end - 32):end])
    return contexts


def start_server(datastore: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore),
         "--port", "0", "--rest-max-budget", "4096", "--rest-max-depth", "256",
         "--scrub-mib-per-s", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    match = re.search(r"listening on (\S+:\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise RuntimeError("server did not start")
    return proc, match.group(1)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ordinary_searches(stub, contexts: list[list[int]], n: int) -> list[float]:
    out = []
    for i in range(n):
        request = wire.search_request(contexts[i % len(contexts)], ORDINARY)
        started = time.perf_counter()
        stub.Search(request, timeout=60)
        out.append(time.perf_counter() - started)
    return out


def abandon(stub, calls: int, deadline_s: float) -> dict:
    request = wire.search_request([0, 0], EXPENSIVE)
    futures = [stub.Search.future(request, timeout=deadline_s) for _ in range(calls)]
    codes: dict[str, int] = {}
    for future in futures:
        error = future.exception(timeout=600)
        code = "OK" if error is None else error.code().name
        codes[code] = codes.get(code, 0) + 1
    return codes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--deadline-s", type=float, default=1.0)
    parser.add_argument("--searches", type=int, default=300, help="ordinary searches per row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--expensive-docs", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ds"
        contexts = build(path, args.expensive_docs, args.seed)
        started = time.perf_counter()
        Datastore.open(path).search([0, 0], EXPENSIVE)
        one_expensive_s = time.perf_counter() - started
        proc, address = start_server(path)
        try:
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.RetrieverStub(channel)
                ordinary_searches(stub, contexts, 50)  # warm up
                rows: dict[str, list[float]] = {"idle": [], "after abandoned calls": []}
                first_waits, codes, cpu = [], {}, []
                for _ in range(args.rounds):
                    rows["idle"] += ordinary_searches(stub, contexts, args.searches)
                    before = cpu_seconds(proc.pid)
                    for code, n in abandon(stub, args.calls, args.deadline_s).items():
                        codes[code] = codes.get(code, 0) + n
                    after = ordinary_searches(stub, contexts, args.searches)
                    cpu.append(cpu_seconds(proc.pid) - before)
                    first_waits.append(after[0])
                    rows["after abandoned calls"] += after
        finally:
            proc.terminate()
            proc.wait(60)

    idle99 = float(np.percentile(rows["idle"], 99))
    idle50 = float(np.percentile(rows["idle"], 50))
    table = []
    for row, values in rows.items():
        p50, p99 = float(np.percentile(values, 50)), float(np.percentile(values, 99))
        table.append({"row": row, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
                      "p50_ratio": p50 / idle50, "p99_ratio": p99 / idle99, "n": len(values)})
    print(f"one expensive search in-process: {one_expensive_s * 1e3:.0f} ms;"
          f" {args.calls} abandoned calls per round, deadline {args.deadline_s} s: {codes}")
    print(f"{'ordinary searches':<24} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>7} {'p99 x':>7}")
    for r in table:
        print(f"{r['row']:<24} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['p50_ratio']:>7.2f}"
              f" {r['p99_ratio']:>7.2f}")
    print(f"first ordinary search after the abandoned calls: "
          f"{', '.join(f'{w * 1e3:.1f} ms' for w in first_waits)}; server CPU per round "
          f"(abandoned calls + ordinary searches): {', '.join(f'{c:.2f} s' for c in cpu)}")
    report = {"calls": args.calls, "deadline_s": args.deadline_s,
              "one_expensive_search_s": one_expensive_s, "codes": codes, "rows": table,
              "first_wait_s": first_waits, "server_cpu_s_per_round": cpu,
              "versions": library_versions()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
