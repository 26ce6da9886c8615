"""Decoding through a retriever that stalls: per-step time against plain decoding, same run.

    python -m bench.retriever_stall [--stall-s 10] [--json bench/out/retriever_stall.json]

Workload (fixed): the demo model (``rest.demo_model``) and the demo's standard-library datastore
served by a ``retriever-server`` subprocess, HumanEval prompts, 64 new tokens each, greedy,
``DecodingConfig(budget=16, context_drafts=False, served_drafts=False)``: a fixed budget (no
calibration), and drafts from the datastore only, so that a step without them is a plain step
and what a stall costs beyond plain decoding is the retrieval's own cost.

Generators take turns, one step each (each keeps a generation going): plain decoding (the
baseline), ``RemoteRetriever`` as it is (breaker, deadlines derived from recent latencies, no new
search to an endpoint that owes a late answer), and ``RemoteRetriever`` as it was (a fixed
deadline, no ejection, no pause: every stalled step waits the whole deadline). Phases:
``--up-s`` seconds served (all three), ``--stall-s`` seconds with the server stopped by SIGSTOP
(a stall: connections stay open, nothing answers; plain and REST), ``--after-s`` seconds after
SIGCONT (all three), then ``--before-s`` seconds of a second stall for plain and the client as it
was (on their own, so that its 100 ms steps do not take the first stall's time). Every step's
wall time is recorded with its phase; the table gives ms per step and the ratio to plain
decoding's steps of the same phase. ``--model`` replaces the demo model; ``--tiny`` uses a random
2-layer model and a small datastore (for the test that runs this script).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import finish_run  # noqa: E402
from decoder import DecodingConfig, RestGenerator  # noqa: E402
from retriever_service.client import RemoteRetriever  # noqa: E402
from retriever_service.replicas import EjectionPolicy, ReplicaPolicy  # noqa: E402

DEADLINE_S = 0.1  # the client's and the decoder's (DecodingConfig.retrieval_deadline_s) default
BEFORE_NAME = "REST, client as it was (fixed deadline, no breaker)"
BEFORE = ReplicaPolicy(min_deadline_s=DEADLINE_S, owed_timeout_s=1e-9,
                       ejection=EjectionPolicy(consecutive_failures=1 << 30))
PHASES = ("up", "stalled", "back", "stalled (before)")


def demo_workload(model_dir: str | None):
    from decoder import load_model
    from rest.corpus import repo_cache_dir
    from rest.demo import demo_datastore, humaneval_prompts
    from rest.demo_model import ensure_demo_model

    model, tokenizer = load_model(model_dir or str(ensure_demo_model()), dtype="float32",
                                  device="cpu")
    datastore = demo_datastore(tokenizer, repo_cache_dir())
    prompts = [tokenizer(p)["input_ids"] for _, p in humaneval_prompts(20)]
    return model, tokenizer, datastore, prompts


def tiny_workload(out_dir: Path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from rest.datastore import build_datastore
    from rest.tokenizer import tokenizer_fingerprint, tokenizer_name

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, eos_token_id=1, bos_token_id=0,
                         pad_token_id=0, initializer_range=0.3)
    model = AutoModelForCausalLM.from_config(config).eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 64, size=n).tolist() for n in (5, 9, 14)]
    docs = [rng.integers(2, 64, size=200).tolist() for _ in range(20)]
    path = out_dir / "ds"
    build_datastore(path, docs, vocab_size=64, tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    return model, tokenizer, path, prompts


def run(args) -> dict:
    import torch

    from bench.service_latency import start_process

    # On a shared 2-core machine, torch's intra-op threads fight the retrieval threads and the
    # other jobs: one thread makes a step's time depend on the step, not on the contention.
    torch.set_num_threads(args.torch_threads)
    workdir = Path(tempfile.mkdtemp(prefix="retriever-stall-"))
    if args.tiny:
        model, tokenizer, datastore, prompts = tiny_workload(workdir)
    else:
        model, tokenizer, datastore, prompts = demo_workload(args.model)
    server, address = start_process(["-m", "retriever_service.server", "--datastore",
                                     str(datastore), "--port", "0", "--log-level", "ERROR"])
    config = DecodingConfig(budget=16, context_drafts=False, served_drafts=False)
    retrievers = {
        "REST": RemoteRetriever(address, deadline_s=DEADLINE_S),
        BEFORE_NAME: RemoteRetriever(address, deadline_s=DEADLINE_S, policy=BEFORE),
    }
    generators = {name: RestGenerator(model, tokenizer, r, config)
                  for name, r in retrievers.items()}
    plain = generators["REST"]
    kinds = ["plain", *generators]
    for generator in generators.values():  # warm-up: first-call costs out of the figures
        generator.generate(prompts[0], 8)
    phases = [  # (name, seconds, whether the server is stopped, the generators taking turns)
        ("up", args.up_s, False, kinds),
        ("stalled", args.stall_s, True, ["plain", "REST"]),
        ("back", args.after_s, False, kinds),
        ("stalled (before)", args.before_s, True, ["plain", BEFORE_NAME]),
    ]
    steps: list[tuple[str, str, float, int]] = []  # (kind, phase, seconds, tokens)
    # One step of each generator in turn (each keeps a generation going), so that every phase
    # measures its generators over the same moments of the machine's load.
    active: dict[str, object] = {}
    started = dict.fromkeys(kinds, 0)
    try:
        for phase, seconds, stopped, turns in phases:
            server.send_signal(signal.SIGSTOP if stopped else signal.SIGCONT)
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                for kind in turns:
                    if kind not in active:
                        prompt = prompts[started[kind] % len(prompts)]
                        started[kind] += 1
                        generator = plain if kind == "plain" else generators[kind]
                        active[kind] = iter(generator.stream(prompt, args.max_new_tokens,
                                                             plain=kind == "plain"))
                    began = time.perf_counter()
                    try:
                        chunk = next(active[kind])
                    except StopIteration:
                        del active[kind]
                        continue
                    if chunk.tokens:  # (a last chunk may only flush text)
                        steps.append((kind, phase, time.perf_counter() - began,
                                      len(chunk.tokens)))
    finally:
        server.send_signal(signal.SIGCONT)
        for retriever in retrievers.values():
            retriever.close()
        server.terminate()
        server.wait(30)
    table: dict = {}
    for kind in kinds:
        for phase in PHASES:
            rows = [(s, n) for k, p, s, n in steps if k == kind and p == phase]
            if not rows:
                continue
            seconds = np.array([s for s, _ in rows])
            table.setdefault(kind, {})[phase] = {
                "steps": len(rows), "ms_per_step": float(seconds.mean() * 1e3),
                "p99_ms": float(np.percentile(seconds, 99) * 1e3),
                "tokens_per_s": sum(n for _, n in rows) / float(seconds.sum()),
            }
    return {"table": table, "client": {name: r.stats() for name, r in retrievers.items()}}


def report(results: dict) -> str:
    table = results["table"]
    lines = ["| generator | " + " | ".join(f"{p}: ms/step (vs plain)" for p in PHASES) + " |",
             "|---|" + "---:|" * len(PHASES)]
    for kind, row in table.items():
        cells = []
        for phase in PHASES:
            if phase not in row or phase not in table["plain"]:
                cells.append("")
                continue
            ratio = row[phase]["ms_per_step"] / table["plain"][phase]["ms_per_step"]
            cells.append(f"{row[phase]['ms_per_step']:.2f} ({ratio:.2f}x)")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--up-s", type=float, default=5.0)
    parser.add_argument("--stall-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=5.0)
    parser.add_argument("--before-s", type=float, default=3.0,
                        help="a second stall, for the client as it was")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", help="a model directory (default: the demo model)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model (tests)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/out/retriever_stall.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    command = " ".join(["python -m bench.retriever_stall", *(argv or sys.argv[1:])])
    return finish_run(run(args), command, args.json, load_before, report)


if __name__ == "__main__":
    main()
