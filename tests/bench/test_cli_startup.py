"""bench/cli_startup.py runs at a tiny size and reports every row."""

from bench.cli_startup import main


def test_cli_startup_bench_runs(tmp_path, capsys):
    report = main(["--rounds", "1", "--files", "5", "--json", str(tmp_path / "out.json")])
    assert set(report["seconds"]) >= {"python -c pass (floor)", "rest --help", "rest datastore query --text"}
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds"].values())
    assert "| rest --help |" in capsys.readouterr().out
    assert (tmp_path / "out.json").exists()
