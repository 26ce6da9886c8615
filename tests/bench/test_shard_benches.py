"""bench/scrub.py and bench/abandoned_searches.py run end to end at a tiny size and report what
docs/BENCHMARKS.md quotes."""

from bench import abandoned_searches, scrub


def test_scrub_bench_reports_throughput_and_latency_rows(tmp_path):
    report = scrub.main(["--tokens", "200000", "--searches", "100", "--json",
                         str(tmp_path / "scrub.json")])
    # Both sections once: the file less its 512-byte header and 0-7 bytes of padding.
    assert 0 <= report["bytes_on_disk"] - 512 - report["throughput"]["bytes"] < 8
    assert report["throughput"]["mib_per_s"] > 0
    assert [r["row"] for r in report["latency"]] == list(scrub.RATES)
    assert all(r["n"] >= 100 for r in report["latency"])
    assert (tmp_path / "scrub.json").exists()


def test_abandoned_searches_bench_reports_rows(tmp_path):
    report = abandoned_searches.main(["--calls", "4", "--searches", "20", "--rounds", "1",
                                      "--expensive-docs", "600", "--deadline-s", "0.05",
                                      "--json", str(tmp_path / "a.json")])
    assert sum(report["codes"].values()) == 4
    assert [r["row"] for r in report["rows"]] == ["idle", "after abandoned calls"]
    assert all(r["n"] == 20 for r in report["rows"])
    assert len(report["first_wait_s"]) == 1
