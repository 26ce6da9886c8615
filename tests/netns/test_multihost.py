"""Decoding across hosts: retriever replicas each in their own network namespace and address, the
decoder in another, a bridge between them (``network.py``). In every case the output is the
model's plain greedy output, and no decoding step waits for retrieval longer than the client's
deadline plus a small margin:

- all up: the same steps and drafts as the datastore in-process;
- one replica killed mid-generation (SIGKILL);
- a replica's link cut (blackhole) and restored;
- 20 ms added to one replica: power of two choices and hedging keep steps near the fast one;
- a replica restarting over and over;
- a whole shard set lost.

The decoder dials one name, ``retrievers:50051``, that resolves to every replica's address (its
namespace's ``/etc/hosts``), and finds the replica sets from their ``Info``.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.netns

DEADLINE_S = 0.15
MARGIN_S = 0.1  # scheduling on a loaded machine, on top of the client's deadline
PORT = 50051


class Decoder:
    """``decoder_run`` in the decoder's namespace; ``wait_step(n)`` follows its progress."""

    def __init__(self, net, host, workload, seconds: float, *extra: str,
                 deadline: float = DEADLINE_S) -> None:
        self.out = net.log_dir / "decoder.json"
        self.process = net.run(host, [
            sys.executable, "-m", "tests.netns.decoder_run", "--endpoints",
            f"retrievers:{PORT}", "--workload", str(workload["spec"]), "--deadline",
            str(deadline), "--seconds", str(seconds), "--out", str(self.out), *extra],
            "decoder")

    def _last(self) -> tuple[bool, int]:
        lines = self.process.output().split()
        steps = [int(n) for word, n in zip(lines, lines[1:]) if word == "step"]
        return "ready" in lines, max(steps, default=0)

    def wait_step(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self._last()[1] < n:
            if not self.process.alive():
                raise AssertionError(f"the decoder exited: {self.process.errors()[-3000:]}")
            assert time.monotonic() < deadline, f"no step {n} within {timeout} s"
            time.sleep(0.02)

    def result(self, timeout: float = 180.0) -> dict:
        self.process.proc.wait(timeout)
        assert self.process.proc.returncode == 0, self.process.errors()[-3000:]
        return json.loads(self.out.read_text())


def start_cluster(net, workload, seconds: float, *decoder_options: str, sets: int = 2,
                  replicas: int = 2, relay=(), deadline: float = DEADLINE_S):
    """The decoder (first: loading its model takes the longest) and ``sets`` replica sets of
    ``replicas`` replicas each, one host per replica; ``relay``: the (set, replica) pairs to
    start behind a delay relay (for ``net.latency`` without netem)."""
    decoder_host = net.host("decoder", 1)
    shards = workload["shards"]
    groups = [shards[i::sets] for i in range(sets)]
    hosts = {(i, j): net.host(f"r{i}{j}", 10 + 10 * i + j)
             for i in range(sets) for j in range(replicas)}
    net.hosts_file(decoder_host, {"retrievers": [h.address for h in hosts.values()]})
    decoder = Decoder(net, decoder_host, workload, seconds, *decoder_options, deadline=deadline)
    cluster = {
        (i, j): [host, net.start_retriever(host, workload["path"], groups[i], PORT,
                                           behind_relay=(i, j) in relay, wait=False)]
        for (i, j), host in hosts.items()
    }
    for host, process in cluster.values():
        net.wait_listening(host, process.serving_port, process)
    return decoder, cluster, groups


def check(result: dict, deadline: float = DEADLINE_S) -> None:
    """Plain decoding's output every time, and no step waiting past the deadline (+ margin)."""
    print(summary(result))  # in the report of a failed test
    assert result["generations"], "nothing was generated"
    assert all(g["identical"] for g in result["generations"]), result["generations"]
    worst = result["retrieval_s"]["max"]
    assert worst <= deadline + MARGIN_S, (worst, result["retrieval_s"])


def summary(result: dict) -> str:
    shards = {label: {k: v for k, v in s.items() if k != "endpoints"}
              for label, s in result["client"]["shards"].items()}
    return json.dumps({"generations": len(result["generations"]),
                       "steps": total(result, "steps"), "failures": total(result, "failures"),
                       "retrieval_s": result["retrieval_s"], "shards": shards,
                       "endpoints": result["client"]["endpoints"]}, indent=1)


def total(result: dict, key: str) -> int:
    return sum(g[key] for g in result["generations"])


def test_all_up_is_identical_to_one_host(net, workload):
    # A generous deadline: this case compares every draft with in-process drafting, and a
    # loaded test machine must not turn a slow search into a difference.
    run, cluster, _ = start_cluster(net, workload, 2.0, "--compare-local", "--fixed-deadline",
                                    deadline=2.0)
    result = run.result()
    check(result, deadline=2.0)
    for g in result["generations"]:
        assert g["local_identical"]
        assert (g["steps"], g["draft_tokens"]) == (g["local_steps"], g["local_draft_tokens"])
        assert g["failures"] == 0
    assert total(result, "steps") < total(result, "draft_tokens")  # drafts were accepted
    shards = result["client"]["shards"]
    assert len(shards) == 2 and all(len(s["endpoints"]) == 2 for s in shards.values())


def test_one_replica_killed_mid_generation(net, workload):
    run, cluster, _ = start_cluster(net, workload, 3.0)
    run.wait_step(30)
    cluster[0, 0][1].kill()
    result = run.result()
    check(result)
    killed = cluster[0, 0][0].address
    endpoint = result["client"]["endpoints"][f"{killed}:{PORT}"]
    assert endpoint["health"] != "serving" or endpoint["ejection"] != "serving"
    assert total(result, "failures") <= 3  # the other replica took over at once


def test_a_cut_link_and_its_return(net, workload):
    run, cluster, _ = start_cluster(net, workload, 5.0, sets=1)
    host = cluster[0, 0][0]
    run.wait_step(30)
    with net.cut(host):  # blackhole: no reset, no error, only silence
        time.sleep(1.5)
    result = run.result()
    check(result)
    steps = result["retrieval_calls"]
    assert total(result, "failures") < 0.2 * steps, result["client"]


def test_twenty_ms_on_one_replica_is_hedged_around(net, workload):
    run, cluster, _ = start_cluster(net, workload, 3.0, sets=1, relay=[(0, 1)])
    slow = cluster[0, 1][0]
    with net.latency(slow, 20):
        result = run.result()
    check(result)
    times = sorted(result["retrieval_times"][20:])  # after the first answers are measured
    p90 = times[int(len(times) * 0.9)]
    assert p90 < 0.020, result["retrieval_s"]  # the fast replica's time, not the added 20 ms
    client = result["client"]
    slow_firsts = client["endpoints"][f"{slow.address}:{PORT}"].get("attempts_first", 0)
    assert slow_firsts < 0.2 * result["retrieval_calls"], client


def test_a_replica_restarting_over_and_over(net, workload):
    run, cluster, groups = start_cluster(net, workload, 5.0, sets=1)
    host, _ = cluster[0, 0]
    stop = threading.Event()
    restarts = []

    def churn() -> None:
        while not stop.is_set():
            cluster[0, 0][1].kill()
            time.sleep(0.2)
            process = net.start_retriever(host, workload["path"], groups[0], PORT,
                                          label="retriever-churn")
            cluster[0, 0][1] = process
            restarts.append(time.monotonic())
            stop.wait(0.5)

    run.wait_step(20)
    thread = threading.Thread(target=churn)
    thread.start()
    try:
        result = run.result()
    finally:
        stop.set()
        thread.join()
    assert len(restarts) >= 3
    check(result)


def test_a_whole_shard_set_lost(net, workload):
    run, cluster, _ = start_cluster(net, workload, 3.0)
    run.wait_step(30)
    for j in range(2):
        cluster[1, j][1].kill()
    result = run.result()
    check(result)
    lost = result["client"]["shards"][",".join(workload["shards"][1::2])]
    assert lost["missed"] > 0  # steps went on without it, with the other set's drafts
