"""The replica bookkeeping on a fake clock: latency estimates, choice, ejection, retry budget,
hedging delays and adaptive deadlines. Nothing here sleeps."""

from __future__ import annotations

import math
import random

import pytest

from retriever_service.replicas import (
    Ejection,
    EjectionPolicy,
    EjectionState,
    LatencyWindow,
    PeakEwma,
    ReplicaPolicy,
    RetryThrottle,
    ShardStats,
    pick_two,
)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_peak_ewma_jumps_to_peaks_and_decays_towards_lower_observations():
    clock = FakeClock()
    ewma = PeakEwma(default_rtt_s=0.01, decay_s=2.0, now=clock)
    assert ewma.estimate() == pytest.approx(0.01)  # a new endpoint: the pessimistic default
    clock.advance(0.001)
    ewma.observe(0.05)
    assert ewma.estimate() == pytest.approx(0.05)  # a peak replaces the estimate at once
    clock.advance(2.0)
    ewma.observe(0.001)  # lower: averaged in with weight 1 - exp(-elapsed / decay)
    expected = 0.05 * math.exp(-1) + 0.001 * (1 - math.exp(-1))
    assert ewma.estimate() == pytest.approx(expected)


def test_peak_ewma_of_an_idle_endpoint_decays_towards_zero():
    """An endpoint that looked slow and gets no traffic is tried again after a while."""
    clock = FakeClock()
    ewma = PeakEwma(default_rtt_s=0.1, decay_s=2.0, now=clock)
    clock.advance(4.0)
    assert ewma.estimate() == pytest.approx(0.1 * math.exp(-2))
    clock.advance(2.0)
    assert ewma.estimate() == pytest.approx(0.1 * math.exp(-3))  # however often it is read


def test_pick_two_takes_the_cheaper_of_two():
    costs = {"a": 3.0, "b": 1.0, "c": 2.0}
    rng = random.Random(0)
    picks = [pick_two(list(costs), costs.__getitem__, rng) for _ in range(300)]
    assert "a" not in picks  # the most expensive never wins a pair
    assert {"b", "c"} <= set(picks)  # "c" wins whenever "b" is not drawn
    assert pick_two(["only"], costs.get, rng) == "only"
    assert pick_two([], costs.get, rng) is None


def test_cost_is_latency_times_in_flight_plus_one():
    """Power of two choices on peak-EWMA x (in flight + 1): a fast replica with a queue loses
    to a slower idle one."""
    latency = {"fast": 0.001, "slow": 0.004}
    in_flight = {"fast": 0, "slow": 0}

    def cost(name):
        return latency[name] * (in_flight[name] + 1)

    rng = random.Random(1)
    assert pick_two(["fast", "slow"], cost, rng) == "fast"
    in_flight["fast"] = 4
    assert pick_two(["fast", "slow"], cost, rng) == "slow"


def test_latency_window_quantiles_need_samples_and_forget_old_ones():
    window = LatencyWindow(size=64, min_samples=16)
    for i in range(15):
        window.add(0.001)
    assert window.quantile(0.95) is None  # too few to know what is slow
    window.add(0.001)
    assert window.quantile(0.95) == 0.001
    for i in range(100):
        window.add(i / 1000)  # 0.000 .. 0.099; the window keeps the last 64: 0.036 .. 0.099
    assert len(window) == 64
    assert window.quantile(0.5) == pytest.approx(0.067)
    assert window.quantile(0.99) == pytest.approx(0.099)


def test_ejection_after_consecutive_failures_then_one_probe():
    clock = FakeClock()
    policy = EjectionPolicy(consecutive_failures=3, base_ejection_time_s=0.2,
                            max_ejection_time_s=1.0, probe_timeout_s=0.5)
    ejection = Ejection(policy, clock)
    assert not ejection.on_failure() and not ejection.on_failure()
    ejection.on_success()  # resets the run of failures
    assert not ejection.on_failure() and not ejection.on_failure()
    assert ejection.on_failure()  # the third in a row ejects
    assert ejection.state is EjectionState.EJECTED and not ejection.serving()
    assert not ejection.claim_probe()
    clock.advance(0.19)
    assert not ejection.claim_probe()
    clock.t = ejection.until
    assert not ejection.serving()  # its time is up: a probe decides, not the next search
    assert ejection.state is EjectionState.PROBING
    assert ejection.claim_probe()
    assert not ejection.claim_probe()  # one probe at a time
    ejection.on_success()
    assert ejection.serving()
    assert ejection.transitions == {
        (EjectionState.SERVING, EjectionState.EJECTED): 1,
        (EjectionState.EJECTED, EjectionState.PROBING): 1,
        (EjectionState.PROBING, EjectionState.SERVING): 1,
    }


def test_ejection_time_grows_with_times_ejected_is_capped_and_decays():
    clock = FakeClock()
    policy = EjectionPolicy(consecutive_failures=1, base_ejection_time_s=0.2,
                            max_ejection_time_s=0.5, decay_interval_s=10.0)
    ejection = Ejection(policy, clock)
    durations = []
    assert ejection.on_failure()
    for _ in range(4):
        durations.append(round(ejection.until - clock(), 6))
        clock.t = ejection.until
        assert ejection.claim_probe()
        assert ejection.on_failure()  # the probe failed: ejected again, for longer
    assert durations == [0.2, 0.4, 0.5, 0.5]  # base x times ejected, capped
    clock.t = ejection.until
    assert ejection.claim_probe()
    ejection.on_success()
    # 30 s without an ejection: the multiplier (5) dropped by 3, so the next one lasts 3 x base
    clock.advance(30.0)
    assert ejection.on_failure()
    assert ejection.until - clock() == pytest.approx(0.5)  # 3 x 0.2 = 0.6, capped
    clock.t = ejection.until
    ejection.claim_probe()
    ejection.on_success()
    clock.advance(100.0)
    ejection.on_failure()
    assert ejection.until - clock() == pytest.approx(0.2)  # long healthy: from the base again


def test_a_probe_without_answer_fails_and_new_evidence_ends_an_ejection():
    clock = FakeClock()
    ejection = Ejection(EjectionPolicy(consecutive_failures=1, base_ejection_time_s=1.0,
                                       max_ejection_time_s=4.0, probe_timeout_s=0.5), clock)
    ejection.on_failure()
    clock.advance(1.0)
    assert ejection.claim_probe()
    clock.advance(0.5)  # a stalled server answers nothing, not even the probe
    assert not ejection.serving() and ejection.state is EjectionState.EJECTED
    assert ejection.until - clock() == pytest.approx(2.0)
    ejection.probe_now()  # its health came back, or a late answer arrived
    assert ejection.claim_probe()
    ejection.on_success()
    assert ejection.serving()


def test_retry_throttle_is_a6s_token_bucket():
    throttle = RetryThrottle(max_tokens=10, token_ratio=0.5)
    for _ in range(4):
        throttle.on_failure()
    assert throttle.allows_more_attempts()  # 6 > 5
    throttle.on_failure()
    assert not throttle.allows_more_attempts()  # 5 is not above half
    throttle.on_success()
    assert throttle.allows_more_attempts()  # 5.5
    for _ in range(100):
        throttle.on_success()
    assert throttle.tokens == 10  # capped
    for _ in range(100):
        throttle.on_failure()
    assert throttle.tokens == 0


def test_hedge_delay_is_the_shards_recent_p95_and_deadline_four_times_its_p99():
    policy = ReplicaPolicy(min_latency_samples=16, min_hedge_delay_s=0.0005,
                           deadline_factor=4.0, min_deadline_s=0.005)
    stats = ShardStats(policy)
    assert stats.hedge_delay() is None  # nothing known: no hedging
    assert stats.deadline(0.1) == 0.1  # nothing known: the retriever's deadline
    for i in range(100):
        stats.latencies.add(0.001 + i * 0.00001)  # 1.00 .. 1.99 ms
    assert stats.hedge_delay() == pytest.approx(0.00194)  # nearest rank: the 95th of 100
    assert stats.deadline(0.1) == pytest.approx(0.00792)  # 4 x p99 (1.98 ms)
    for _ in range(50):
        stats.latencies.add(0.003)
    assert stats.deadline(0.1) == pytest.approx(0.012)
    assert stats.deadline(0.01) == 0.01  # never beyond the retriever's own deadline
    fast = ShardStats(policy)
    for _ in range(20):
        fast.latencies.add(0.00001)
    assert fast.hedge_delay() == 0.0005  # never sooner than the floor
    assert fast.deadline(0.1) == 0.005  # nor a deadline shorter than its floor


def test_policies_refuse_nonsense():
    with pytest.raises(ValueError):
        EjectionPolicy(consecutive_failures=0)
    with pytest.raises(ValueError):
        EjectionPolicy(base_ejection_time_s=2.0, max_ejection_time_s=1.0)
    with pytest.raises(ValueError):
        ReplicaPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        ReplicaPolicy(hedge_quantile=0)
