"""bench/replica_load.py at a tiny size: every phase measured, the kill survived."""

from bench import replica_load


def test_replica_load_runs_and_survives_a_killed_replica(tmp_path):
    out = tmp_path / "load.json"
    results = replica_load.main(["--tiny", "--seconds", "2", "--sessions", "3",
                                 "--wire-samples", "20", "--think-ms", "1", "--deadline", "0.5",
                                 "--json", str(out)])
    assert out.exists()
    phases = results["phases"]
    assert set(phases) == {"all up", "one replica killed", "in-process (baseline)"}
    for row in phases.values():
        assert row["steps"] > 0 and row["p50_ms"] > 0
    assert phases["one replica killed"]["steps"] > 0  # the other replica took the load
    endpoints = results["client"]["endpoints"]
    assert len(endpoints) == 4
    assert results["wire"]["request_bytes_per_step"] > 0
    assert 0 <= results["wire"]["merge_certified_exact"] <= 1
