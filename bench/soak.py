"""Soak: many decoding sessions against retriever servers that are killed and started again.

Workload: ``--sessions`` threads, each generating greedily over and over (``--max-new-tokens``
each, prompts taken in turn from ``--prompts`` seeded random prompts), with drafts from
``--servers`` replicas of one datastore (the prompts with their plain continuations, so drafts
are found and accepted). A chaos thread kills a server with SIGKILL every ``--restart-every-s``
seconds (now and then all of them at once), leaves it down ``--down-s`` seconds and starts it
again on the same port. It runs ``--seconds`` seconds, then reports:

- generations, and how many equalled plain decoding of the same prompt (measured first, without
  any retriever): every one must;
- searches made (one per drafting step; each asks for all back-off levels), answered and not,
  and the latency of a search as the decoder saw it (p50, p99, max);
- errors by kind: the client's failed attempts by reason (a gRPC status, ``late``, ``invalid``)
  and the searches that got no answer at all;
- restarts done.

    python -m bench.soak --model DIR [--seconds 60] [--sessions 4] [--servers 2]
        [--restart-every-s 2] [--down-s 0.5] [--max-new-tokens 32] [--json out.json]

Exit status 1 when an output differed from plain decoding or a generation raised.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch

from rest.retriever import RetrievalSession, Retriever

ROOT = Path(__file__).resolve().parents[1]


class TimedRetriever(Retriever):
    """``retriever`` with the latency of every search its sessions make recorded in ``latencies``
    (seconds) and the unanswered ones counted in ``unanswered``."""

    def __init__(self, retriever: Retriever) -> None:
        self.inner = retriever
        self.latencies: list[float] = []
        self.unanswered = 0
        self._lock = threading.Lock()

    def info(self):
        return self.inner.info()

    def session(self) -> RetrievalSession:
        return _TimedSession(self, self.inner.session())

    def close(self) -> None:
        self.inner.close()

    def record(self, latency: float, answered: bool) -> None:
        with self._lock:
            self.latencies.append(latency)
            self.unanswered += not answered


class _TimedSession(RetrievalSession):
    def __init__(self, owner: TimedRetriever, inner: RetrievalSession) -> None:
        self._owner = owner
        self._inner = inner

    def search(self, context, params):
        start = time.perf_counter()
        result = self._inner.search(context, params)
        self._owner.record(time.perf_counter() - start, result is not None)
        return result

    def search_levels(self, context, params, levels):
        start = time.perf_counter()
        results = self._inner.search_levels(context, params, levels)
        self._owner.record(time.perf_counter() - start, results is not None)
        return results

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name):  # failures, searches, ... of the real session
        return getattr(self._inner, name)


class RestartingServer:
    """One ``retriever-server`` process on a fixed port, killed and started again at will."""

    def __init__(self, datastore: Path, port: int) -> None:
        self.datastore = datastore
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "retriever_service.server", "--datastore", str(self.datastore),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--log-level", "WARNING"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # the server prints its address once it listens
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"retriever-server on port {self.port} did not start: {line!r}")
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Tally:
    generations: int = 0
    identical: int = 0
    differing: list[dict] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def random_prompts(n: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    low = min(10, vocab_size // 2)  # keep clear of the special tokens at the start
    return [[rng.randrange(low, vocab_size) for _ in range(rng.randrange(8, 25))]
            for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def counter_totals(reader, name: str, key: str) -> Counter:
    totals: Counter = Counter()
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        totals[str(point.attributes.get(key))] += point.value
    return totals


def run_soak(model_path: str, work_dir: Path, *, seconds: float, sessions: int, servers: int,
             restart_every_s: float, down_s: float, max_new_tokens: int, n_prompts: int,
             budget: int, deadline_s: float, seed: int, threads: int, out=sys.stdout) -> dict:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from decoder import DecodingConfig, RestGenerator, load_model
    from rest.datastore import build_datastore
    from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
    from retriever_service.client import RemoteRetriever

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_path)
    vocab_size = model.get_input_embeddings().num_embeddings
    prompts = random_prompts(n_prompts, vocab_size, seed)
    plain_generator = RestGenerator(model, tokenizer, None, DecodingConfig(budget=budget))
    plain = [plain_generator.generate(p, max_new_tokens=max_new_tokens, plain=True).tokens
             for p in prompts]

    datastore = Path(work_dir) / "ds"
    build_datastore(datastore, [p + o for p, o in zip(prompts, plain)] * 2,
                    vocab_size=vocab_size, tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    pool = [RestartingServer(datastore, free_port()) for _ in range(servers)]
    for server in pool:
        server.start()
    reader = InMemoryMetricReader()
    remote = RemoteRetriever([s.address for s in pool], deadline_s=deadline_s,
                             meter_provider=MeterProvider(metric_readers=[reader]))
    retriever = TimedRetriever(remote)
    config = DecodingConfig(budget=budget, retrieval_deadline_s=max(deadline_s * 2, 0.1))
    tally = Tally()
    stop = threading.Event()
    restarts = Counter()

    def decode(worker: int) -> None:
        generator = RestGenerator(model, tokenizer, retriever, config)
        turn = worker
        while not stop.is_set():
            index = turn % len(prompts)
            turn += sessions
            try:
                result = generator.generate(prompts[index], max_new_tokens=max_new_tokens)
            except Exception as exc:  # noqa: BLE001 - reported: a generation must never raise
                with tally.lock:
                    tally.crashes.append(f"{type(exc).__name__}: {exc}")
                continue
            with tally.lock:
                tally.generations += 1
                tally.tokens += result.stats.new_tokens
                tally.steps += result.stats.steps
                if result.tokens == plain[index]:
                    tally.identical += 1
                else:
                    tally.differing.append({"prompt": index, "got": result.tokens,
                                            "plain": plain[index]})

    def chaos() -> None:
        # One server, then all of them at once (no answer at all until one is back), in turn.
        rng = random.Random(seed + 1)
        for turn in itertools.count():
            if stop.wait(restart_every_s):
                break
            victims = pool if turn % 2 else [rng.choice(pool)]
            for server in victims:
                server.kill()
            restarts["all at once" if len(victims) == len(pool) > 1 else "one"] += 1
            if stop.wait(down_s):
                break
            for server in victims:
                server.start()

    try:
        remote.info()  # every server is up: the generators' tokenizer checks pass
        workers = [threading.Thread(target=decode, args=(i,), name=f"soak-session-{i}")
                   for i in range(sessions)]
        chaos_thread = threading.Thread(target=chaos, name="soak-chaos")
        started = time.perf_counter()
        for thread in workers:
            thread.start()
        chaos_thread.start()
        time.sleep(seconds)
        stop.set()
        chaos_thread.join()
        for thread in workers:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        retriever.close()
        for server in pool:
            server.kill()

    searches = len(retriever.latencies)
    failed_attempts = counter_totals(reader, "rest.retriever.client.failures", "reason")
    errors = {f"attempt {reason}": int(n) for reason, n in sorted(failed_attempts.items())}
    errors["search without an answer"] = retriever.unanswered
    report = {
        "seconds": round(elapsed, 1),
        "sessions": sessions,
        "servers": servers,
        "restarts": dict(restarts),
        "server_starts": sum(s.starts for s in pool),
        "generations": tally.generations,
        "identical_to_plain": tally.identical,
        "differing": tally.differing,
        "crashes": tally.crashes,
        "tokens": tally.tokens,
        "M": round(tally.tokens / tally.steps, 3) if tally.steps else 0.0,
        "searches": searches,
        "searches_answered": searches - retriever.unanswered,
        "search_p50_ms": round(1e3 * percentile(retriever.latencies, 0.50), 3),
        "search_p99_ms": round(1e3 * percentile(retriever.latencies, 0.99), 3),
        "search_max_ms": round(1e3 * max(retriever.latencies, default=0.0), 3),
        "errors": errors,
    }
    print_report(report, out)
    return report


def print_report(report: dict, out) -> None:
    rows = [
        ("duration", f"{report['seconds']} s, {report['sessions']} sessions,"
                     f" {report['servers']} servers"),
        ("restarts", ", ".join(f"{n} {k}" for k, n in report["restarts"].items()) or "none"),
        ("generations", f"{report['generations']} ({report['identical_to_plain']} identical to"
                        " plain decoding)"),
        ("generations that raised", str(len(report["crashes"]))),
        ("tokens, M", f"{report['tokens']}, {report['M']}"),
        ("searches (answered)", f"{report['searches']} ({report['searches_answered']})"),
        ("search latency p50 / p99 / max",
         f"{report['search_p50_ms']} / {report['search_p99_ms']} / {report['search_max_ms']} ms"),
    ]
    rows += [(f"errors: {kind}", str(n)) for kind, n in report["errors"].items()]
    print("| measure | value |", file=out)
    print("|---|---|", file=out)
    for name, value in rows:
        print(f"| {name} | {value} |", file=out)


@click.command()
@click.option("--model", "model_path", required=True, help="Model directory.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--sessions", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--servers", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--restart-every-s", default=2.0, show_default=True,
              type=click.FloatRange(min=0.1))
@click.option("--down-s", default=0.5, show_default=True, type=click.FloatRange(min=0))
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--prompts", "n_prompts", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--budget", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--deadline-s", default=0.05, show_default=True,
              type=click.FloatRange(min=0.001), help="The client's deadline per search.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Torch threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the report here.")
def main(model_path, json_path, **options) -> None:
    with tempfile.TemporaryDirectory(prefix="rest-soak-") as work_dir:
        report = run_soak(model_path, Path(work_dir), **options)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    if report["differing"] or report["crashes"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
