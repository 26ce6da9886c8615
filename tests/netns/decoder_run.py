"""The decoder host of the multi-host tests: generations through ``RemoteRetriever``, measured.

    python -m tests.netns.decoder_run --endpoints retrievers:50051 --workload workload.json \
        --deadline 0.15 --seconds 4 --out result.json

Loads the tiny test model (``tests.decoder.helpers``), waits for the retrievers to answer, then
decodes the workload's prompts in turn,
until ``--seconds`` have passed (every prompt at least once), drafting from the retrievers; each
retrieval call (all of a step's back-off levels) is timed. Prints ``ready`` once the retriever
answered ``Info`` and ``step N`` after each decoding step, so that a test can time its faults;
writes the outputs and figures to ``--out``. With ``--compare-local``, every generation is also
run against the datastore in-process, for the same steps and drafts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from decoder import DecodingConfig, RestGenerator
from rest.retriever import LocalRetriever, RetrievalSession, Retriever, RetrieverUnavailable
from retriever_service.client import RemoteRetriever
from retriever_service.replicas import ReplicaPolicy
from tests.decoder.helpers import make_model, make_tokenizer

CONFIG = DecodingConfig(budget=16, retrieval_levels=3, retrieval_deadline_s=None,
                        context_drafts=False, served_drafts=False)


class TimedSession(RetrievalSession):
    def __init__(self, session: RetrievalSession, times: list[float]) -> None:
        self.session = session
        self.times = times

    def search(self, context, params):
        return self.session.search(context, params)

    def search_levels(self, context, params, levels):
        started = time.perf_counter()
        try:
            return self.session.search_levels(context, params, levels)
        finally:
            self.times.append(time.perf_counter() - started)

    @property
    def failures(self) -> int:  # type: ignore[override]
        return self.session.failures

    def close(self) -> None:
        self.session.close()


class TimedRetriever(Retriever):
    """The retriever, with every retrieval call of every session timed."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.times: list[float] = []

    def info(self):
        return self.retriever.info()

    def session(self) -> TimedSession:
        return TimedSession(self.retriever.session(), self.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", required=True)
    parser.add_argument("--workload", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=0.15)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--compare-local", action="store_true")
    parser.add_argument("--fixed-deadline", action="store_true",
                        help="no deadlines derived from recent latencies")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    workload = json.loads(args.workload.read_text())
    model, tokenizer = make_model("llama"), make_tokenizer()
    policy = ReplicaPolicy(min_deadline_s=args.deadline) if args.fixed_deadline else None
    remote = RemoteRetriever(args.endpoints, deadline_s=args.deadline, policy=policy)
    waited = time.monotonic()  # started before the retrievers, which may still be starting
    while True:
        try:
            remote.info()
            break
        except RetrieverUnavailable:
            if time.monotonic() - waited > 120:
                raise
            time.sleep(0.05)
    timed = TimedRetriever(remote)
    generator = RestGenerator(model, tokenizer, timed, CONFIG)
    local = None
    if args.compare_local:
        local = RestGenerator(model, tokenizer, LocalRetriever(workload["datastore"]), CONFIG)
    print("ready", flush=True)

    generations = []
    step = 0
    started = time.monotonic()
    while time.monotonic() - started < args.seconds or len(generations) < len(workload["cases"]):
        case = workload["cases"][len(generations) % len(workload["cases"])]
        stream = generator.stream(case["prompt"], case["max_new_tokens"])
        tokens = []
        for chunk in stream:
            tokens += chunk.tokens
            step += 1
            print(f"step {step}", flush=True)
        stats = stream.result.stats
        row = {"identical": tokens == case["expected"], "steps": stats.steps,
               "draft_tokens": stats.draft_tokens, "failures": stats.retrieval_failures}
        if local is not None:
            alone = local.generate(case["prompt"], case["max_new_tokens"])
            row.update(local_identical=alone.tokens == case["expected"],
                       local_steps=alone.stats.steps, local_draft_tokens=alone.stats.draft_tokens)
        generations.append(row)
    times = sorted(timed.times)
    result = {
        "generations": generations,
        "retrieval_calls": len(times),
        "retrieval_s": {"max": times[-1], "p50": times[len(times) // 2],
                        "p90": times[int(len(times) * 0.9)], "p99": times[int(len(times) * 0.99)]},
        "retrieval_times": timed.times,
        "client": remote.stats(),
    }
    args.out.write_text(json.dumps(result))
    remote.close()
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
