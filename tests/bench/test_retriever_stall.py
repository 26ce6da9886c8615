"""bench/retriever_stall.py at a tiny size: every phase measured; a stall costs the client as it
was the whole deadline per step, and the client as it is far less."""

from bench import retriever_stall


def test_retriever_stall_runs_every_phase(tmp_path):
    out = tmp_path / "stall.json"
    results = retriever_stall.main(["--tiny", "--up-s", "1", "--stall-s", "2", "--after-s", "1",
                                    "--before-s", "2", "--max-new-tokens", "24",
                                    "--json", str(out)])
    assert out.exists()
    table = results["table"]
    before = retriever_stall.BEFORE_NAME
    assert set(table["plain"]) == set(retriever_stall.PHASES)
    assert set(table["REST"]) == {"up", "stalled", "back"}
    assert set(table[before]) == {"up", "back", "stalled (before)"}
    # the whole 100 ms deadline (2 s of stall: the step it began in, partly before, weighs little)
    assert table[before]["stalled (before)"]["ms_per_step"] > 80
    assert table["REST"]["stalled"]["ms_per_step"] < 0.5 * table[before]["stalled (before)"][
        "ms_per_step"]
