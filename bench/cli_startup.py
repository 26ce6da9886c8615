"""How long the ``rest`` commands that should feel instant take to start and finish.

    python bench/cli_startup.py [--rounds 10] [--json bench/out/cli_startup.json]

Workload (fixed): a datastore of the first 200 files of the standard library (``rest.corpus``),
tokenized by a byte-level BPE tokenizer (vocabulary 4,096) trained on them and saved as a
``transformers`` tokenizer directory. Rows, each a fresh ``python`` process:

- ``python -c pass``: the interpreter's own start, the floor of every row;
- ``import torch, transformers``: what every command paid before the CLI imported them lazily
  (listing the subcommands imported both; ``query --text`` loaded the tokenizer with them);
- ``rest --help``, ``rest datastore info``, ``rest datastore query --tokens`` and
  ``rest datastore query --text`` (``--json`` output, the same work as the readable one).

The rows take turns, one process each per round, so that they share the machine's moments of
load; the table gives the median and the slowest run of each, and the median over the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REST = "from rest.cli import main; main()"


def make_datastore(where: Path, files: int) -> tuple[Path, Path]:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from rest.corpus import stdlib_files

    texts = [f.read_bytes().decode("utf-8", errors="replace") for f in stdlib_files()[:files]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=4096, min_frequency=2, show_progress=False)
    tokenizer_dir = where / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(tokenizer_dir)
    corpus = where / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    datastore = where / "ds"
    subprocess.run([sys.executable, "-c", REST, "datastore", "build", "--tokenizer", str(tokenizer_dir),
                    "--input", str(corpus), "--out", str(datastore), "--no-progress", "--json"],
                   check=True, capture_output=True, env=environment())  # fmt: skip
    return datastore, tokenizer_dir


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def rows(datastore: Path) -> dict[str, list[str]]:
    return {
        "python -c pass (floor)": ["-c", "pass"],
        "import torch, transformers": ["-c", "import torch, transformers"],
        "rest --help": ["-c", REST, "--help"],
        "rest datastore info": ["-c", REST, "datastore", "info", str(datastore), "--json"],
        "rest datastore query --tokens": ["-c", REST, "datastore", "query", str(datastore), "--tokens", "100,200,300",
                                          "--json"],
        "rest datastore query --text": ["-c", REST, "datastore", "query", str(datastore), "--text", "def __init__(self",
                                        "--json"],
    }  # fmt: skip


def measure(commands: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, args in commands.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, *args], check=True, capture_output=True, env=environment())
            times[name].append(time.perf_counter() - start)
    return times


def table(times: dict[str, list[float]]) -> str:
    floor = statistics.median(times["python -c pass (floor)"])
    lines = ["| command | median ms | slowest ms | median / floor |", "|---|---:|---:|---:|"]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median * 1e3:,.0f} | {max(values) * 1e3:,.0f} | {median / floor:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--files", type=int, default=200, help="Standard-library files in the datastore.")
    parser.add_argument("--json", dest="json_path", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        datastore, _ = make_datastore(Path(tmp), args.files)
        times = measure(rows(datastore), args.rounds)
    print(table(times))
    print(f"{args.rounds} rounds; 1-minute load average {os.getloadavg()[0]:.1f} at the end")
    report = {"rounds": args.rounds, "files": args.files, "seconds": times, "load_average": os.getloadavg()[0]}
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
