"""bench/engine.py runs end to end at a tiny size, and its replay rule is the replay's."""

import json
import subprocess
import sys
from pathlib import Path

from bench.engine import METHODS, accepted
from rest.types import SearchResult

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "engine.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.engine", "--workload", "random", "--sizes", "20000,40000",
         "--queries", "60", "--cache", str(tmp_path / "cache"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    for row in rows:
        assert row["steps"] > 0
        for name in METHODS:
            assert 0 < row[name]["p50_us"] <= row[name]["p99_us"]
    for name in METHODS:
        assert name in done.stdout


def test_accepted_follows_the_longest_matching_path():
    # Paths: 5, 5-6, 5-6-7, 8; the target continues 5, 6, 9.
    tree = SearchResult(1, 3, tokens=(5, 6, 7, 8), parents=(-1, 0, 1, -1), counts=(3, 2, 1, 1))
    assert accepted(tree, [0, 5, 6, 9], 0) == 2
    assert accepted(tree, [0, 8, 6], 0) == 1
    assert accepted(tree, [0, 6, 5], 0) == 0
