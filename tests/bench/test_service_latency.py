"""bench/service_latency.py runs every row end to end at a tiny size (synthetic corpus)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "service.json"
    done = subprocess.run(
        [sys.executable, "bench/service_latency.py", "--workload", "random", "--n", "120",
         "--seconds", "0.2", "--concurrency", "1", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    latency = results["latency"]
    for name in ("engine", "echo stream", "SearchStream", "drafting step in-process",
                 "drafting step via retriever-server", "drafting step via RemoteRetriever",
                 "native echo stream", "SearchStream, search port",
                 "drafting step via the search port"):
        assert 0 < latency[name]["p50_us"] <= latency[name]["p99_us"], name
    assert set(results["throughput"]) == {"1", "2"}
    assert "x the echo stream round trip" in done.stdout
    assert "remote step (--search-port)" in done.stdout
    assert results["throughput"]["1"]["SearchStream, search port"]["errors"] == 0
    assert results["search_server_exit_code"] == 0
