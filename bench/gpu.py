"""GPU figures in one prepared run: verification cost against draft-tree size, then the demo.

    python -m bench.gpu [--shape 7b] [--contexts 512,2048] [--sizes 1,2,4,8,16,32,64,128]
        [--repeats 20] [--device cuda] [--demo/--no-demo] [--server-bench/--no-server-bench]
        [--out bench/out/gpu]

Part 1, verification cost. A random-weight Llama of LLaMA-2-7B shape (hidden 4096, 32 layers,
32 heads, intermediate 11008, vocabulary 32000) in bf16 with sdpa attention. For each context
length the context is prefilled into the KV cache; then one verification forward pass of a
draft tree of each size (root included) is timed through the decoder's own ``build_tree_batch``
and ``forward_tree_batch``, the path every decoding step takes, and the tree's keys and values
are trimmed again (``BatchedCache.commit``). The trees are chains: the tree's shape changes the mask, not the work.
After two warm-up rounds, ``--repeats`` rounds time every size in turn (so that a burst of load
hits all sizes alike); the table gives the median per size and its ratio to a single token.

Part 2, the demo end to end on the same device: ``rest demo --device cuda`` (model, datastore,
``retriever-server`` on loopback, 20 HumanEval prompts, REST against plain decoding).

Part 3, the worker under load on the same device: ``python -m bench.decoder_server --device
cuda`` (``decoder-server`` on the demo model and datastore, concurrency 1, 4 and 16, drafting on
and off; ``--server-arg`` passes more arguments to it).

Writes ``verification.json``, ``verification.png``, the demo's results and
``decoder_server.json`` under ``--out``, and prints the tables. ``--shape tiny`` runs part 1 with a toy model (for checking the script on a
CPU). For a GPU machine without network access whose Python lacks this project's packages (or
has a newer transformers than the one pinned here), ``bash bench/gpu_wheels.sh`` prepares the
wheels to take along, and its header gives the command to run there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from decoder.kv_cache import BatchedCache
from decoder.model_support import profile_model
from decoder.verify import RowTree, build_tree_batch, forward_tree_batch, prefill

SHAPES = {
    # LLaMA-2-7B.
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    # For checking the script where there is no GPU.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=128, vocab_size=512),
}


def random_model(shape: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama with random weights, created directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of 7B weights on the way
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def verification_cost(model, context_len: int, sizes: list[int], repeats: int) -> dict[int, list[float]]:
    """Seconds of each timed verification pass, per tree size (root included)."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(context_len)
    tokens = torch.randint(0, vocab, (context_len + max(sizes),), generator=generator).tolist()
    profile = profile_model(model)
    kv = BatchedCache()
    prefix_len = context_len - 1  # the cache holds the context minus the root
    kv.append(prefill(model, tokens[:prefix_len])[0], prefix_len)
    trees = []
    for size in sizes:
        chain = RowTree(tokens[prefix_len], tokens[context_len : context_len + size - 1],
                        list(range(-1, size - 2)))
        trees.append(build_tree_batch([chain], [prefix_len], prefix_len, profile, model.dtype,
                                      model.device))
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for round_ in range(repeats + 2):
        for size, inputs in zip(sizes, trees):
            synchronize(model.device)
            start = time.perf_counter()
            forward_tree_batch(model, profile, kv, inputs)
            synchronize(model.device)
            if round_ >= 2:
                times[size].append(time.perf_counter() - start)
            kv.commit(prefix_len, [[]])
    return times


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for context_len, rows in results["contexts"].items():
        sizes = [r["tree_tokens"] for r in rows]
        ax.plot(sizes, [r["median_ms"] for r in rows], marker="o", label=f"context {context_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens verified in one forward pass (tree size)")
    ax.set_ylabel("ms per verification pass")
    ax.set_title(f"{results['shape']} {results['dtype']}, {results['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| context | tree tokens | median ms | p90 ms | / 1 token |", "|---|---:|---:|---:|---:|"]
    for context_len, rows in results["contexts"].items():
        for r in rows:
            lines.append(f"| {context_len} | {r['tree_tokens']} | {r['median_ms']:.2f} | "
                         f"{r['p90_ms']:.2f} | {r['vs_one_token']:.2f}x |")
    return "\n".join(lines)


@click.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="7b", show_default=True)
@click.option("--contexts", default="512,2048", show_default=True)
@click.option("--sizes", default="1,2,4,8,16,32,64,128", show_default=True)
@click.option("--repeats", default=20, show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True)
@click.option("--demo/--no-demo", default=True, show_default=True,
              help="Also run `rest demo` on the device (part 2).")
@click.option("--server-bench/--no-server-bench", default=True, show_default=True,
              help="Also run bench.decoder_server on the device (part 3).")
@click.option("--server-arg", "server_args", multiple=True,
              help="One more argument for bench.decoder_server (repeatable).")
@click.option("--out", "out_dir", default="bench/out/gpu", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def main(shape, contexts, sizes, repeats, device, dtype, demo, server_bench, server_args, out_dir):
    """Verification cost against tree size (7B shape, bf16), then the demo, on one device."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    sizes_list = [int(s) for s in sizes.split(",")]
    model = random_model(shape, device, getattr(torch, dtype))
    dev = model.device
    results = {"shape": shape, "dtype": dtype, "device": device_name(dev),
               "torch": torch.__version__, "repeats": repeats, "contexts": {}}
    print(f"{shape} model, {sum(p.numel() for p in model.parameters()):,} parameters, {dtype}, "
          f"on {results['device']}", flush=True)
    for context_len in (int(c) for c in contexts.split(",")):
        times = verification_cost(model, context_len, sizes_list, repeats)
        one = float(np.median(times[sizes_list[0]]))
        results["contexts"][context_len] = [
            {"tree_tokens": size, "median_ms": float(np.median(t)) * 1e3,
             "p90_ms": float(np.percentile(t, 90)) * 1e3, "vs_one_token": float(np.median(t)) / one}
            for size, t in times.items()
        ]
        print(f"context {context_len}: done", flush=True)
    (out_dir / "verification.json").write_text(json.dumps(results, indent=2))
    chart(results, out_dir / "verification.png")
    print(table(results), flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if demo:
        # A separate process: the demo starts its own server and loads its own model.
        command = [sys.executable, "-m", "rest.cli", "demo", "--device", device,
                   "--out", str(out_dir / "demo")]
        print("$ " + " ".join(command), flush=True)
        returncode = subprocess.call(command)
        if returncode != 0:
            raise click.ClickException(f"the demo failed (exit {returncode})")
    if server_bench:
        # A separate process too: it starts decoder-server, which loads the model itself.
        command = [sys.executable, "-m", "bench.decoder_server", "--device", device,
                   "--json", str(out_dir / "decoder_server.json"), *server_args]
        print("$ " + " ".join(command), flush=True)
        returncode = subprocess.call(command)
        if returncode != 0:
            raise click.ClickException(f"the decoder-server benchmark failed (exit {returncode})")


if __name__ == "__main__":
    main()
