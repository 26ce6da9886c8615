"""How the client chooses among replicas: load, latency, ejection and retry budgets.

Pure bookkeeping with an injected clock (``now``: a callable returning seconds), so that decay,
ejection and hedging decisions are tested without sleeping. The client (``client.py``) owns the
threads and the calls; this module only keeps score.

- ``PeakEwma``: an endpoint's latency estimate, which jumps to every peak and decays towards
  lower observations, and towards zero while nothing is observed (tower-rs/tower
  ``tower/src/load/peak_ewma.rs``). Cost = estimate x (in flight + 1); a new endpoint starts at
  a pessimistic default, and an idle one decays until it gets picked again.
- ``pick_two``: power of two choices on that cost (linkerd ``linkerd/proxy/balance``).
- ``LatencyWindow``: recent latencies and their quantiles: the hedging delay is the shard's
  recent p95, the adaptive deadline a multiple of its p99.
- ``Ejection``: passive outlier ejection with a half-open probe, gRPC A50 / Envoy
  ``outlier.rst`` on consecutive failures (Envoy's statistical ejection assumes five or more hosts
  and a request volume floor; a shard here has two or three replicas). Ejected for base time x
  times ejected, capped; the multiplier decays while the endpoint stays healthy. This is the
  "circuit breaker" that stops asking a stalled server: after ``consecutive_failures`` failures no
  search goes to it until its ejection ends, then one probe decides.
- ``RetryThrottle``: gRPC A6's token bucket: -1 per failed search, +``token_ratio`` per
  success, no failover or hedge while at or below half, so that a sick shard cannot double its
  own load.

What is deliberately not copied: Envoy's panic threshold routes to every host when too few are
healthy. For a decoder, skipping retrieval costs one step's drafts and never the output, while
waiting on a stalled shard costs the deadline on every step; so a shard whose replicas are all
ejected is skipped (and probed when an ejection ends), not forced.
"""

from __future__ import annotations

import enum
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Clock = Callable[[], float]


class PeakEwma:
    """A latency estimate sensitive to peaks (seconds).

    ``observe(rtt)``: a higher value replaces the estimate at once; a lower one is averaged in
    with weight ``1 - exp(-elapsed / decay_s)``. ``estimate()`` also decays the estimate towards
    zero for the time since the last update, so an endpoint that gets no traffic (because it
    looked slow) is tried again after a while instead of being starved.
    """

    def __init__(self, default_rtt_s: float, decay_s: float, now: Clock) -> None:
        if default_rtt_s <= 0 or decay_s <= 0:
            raise ValueError("default_rtt_s and decay_s must be > 0")
        self._decay_s = decay_s
        self._now = now
        self._rtt = default_rtt_s
        self._stamp = now()

    def _update(self, rtt: float) -> float:
        now = self._now()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        if rtt > self._rtt:
            self._rtt = rtt
        else:
            weight = math.exp(-elapsed / self._decay_s)
            self._rtt = self._rtt * weight + rtt * (1.0 - weight)
        return self._rtt

    def observe(self, rtt_s: float) -> None:
        self._update(rtt_s)

    def estimate(self) -> float:
        return self._update(0.0)


def pick_two(candidates: Sequence, cost: Callable[[object], float], rng: random.Random):
    """Power of two choices: two distinct candidates at random, the cheaper one (the first drawn
    on a tie). ``None`` when there are no candidates."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(range(len(candidates)), 2)
    first, second = candidates[a], candidates[b]
    return second if cost(second) < cost(first) else first


class LatencyWindow:
    """The last ``size`` latencies (seconds) and their quantiles.

    Quantiles are recomputed at most every ``size // 16`` observations: a step asks for them
    once per shard, and sorting on every call would cost more than the search.
    """

    def __init__(self, size: int = 256, min_samples: int = 16) -> None:
        self._values = [0.0] * size
        self._count = 0
        self._next = 0
        self._min_samples = min_samples
        self._refresh_every = max(1, size // 16)
        self._sorted: list[float] | None = None
        self._sorted_at = -1
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values[self._next] = value
            self._next = (self._next + 1) % len(self._values)
            self._count += 1

    def __len__(self) -> int:
        return min(self._count, len(self._values))

    @property
    def total(self) -> int:
        """How many latencies were ever added."""
        return self._count

    def values(self) -> list[float]:
        """The latencies in the window (oldest first once it has wrapped around)."""
        with self._lock:
            n = min(self._count, len(self._values))
            if self._count <= len(self._values):
                return self._values[:n]
            return self._values[self._next:] + self._values[:self._next]

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank), or ``None`` below ``min_samples`` observations."""
        with self._lock:
            n = min(self._count, len(self._values))
            if n < self._min_samples:
                return None
            if self._sorted is None or self._count - self._sorted_at >= self._refresh_every:
                self._sorted = sorted(self._values[:n])
                self._sorted_at = self._count
            values = self._sorted
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class EjectionState(enum.Enum):
    SERVING = "serving"
    EJECTED = "ejected"
    PROBING = "probing"  # the ejection ended: one probe decides


@dataclass(frozen=True)
class EjectionPolicy:
    """When to eject an endpoint, and for how long (gRPC A50 field names where they exist)."""

    consecutive_failures: int = 3
    base_ejection_time_s: float = 0.2
    max_ejection_time_s: float = 2.0
    # The times-ejected multiplier drops by one for every interval of this length without an
    # ejection, so an endpoint that failed once long ago starts again from the base time.
    decay_interval_s: float = 10.0
    # A probe unanswered for this long failed (a stalled server answers nothing at all).
    probe_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1:
            raise ValueError("consecutive_failures must be >= 1")
        if not 0 < self.base_ejection_time_s <= self.max_ejection_time_s:
            raise ValueError("need 0 < base_ejection_time_s <= max_ejection_time_s")
        if self.decay_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("decay_interval_s and probe_timeout_s must be > 0")


class Ejection:
    """One endpoint's ejection state (a small state machine; every transition is counted).

    SERVING --``consecutive_failures`` failures--> EJECTED for base x times ejected (capped)
    EJECTED --time is up, or ``probe_now()``--> PROBING: ``claim_probe()`` grants one probe
    PROBING --success--> SERVING
    PROBING --failure, or no answer within ``probe_timeout_s``--> EJECTED again, for longer

    The client sends a probe beside the step's own search and does not wait for it: a probe of
    a server that is still stalled costs nothing but the search it sends.
    """

    def __init__(self, policy: EjectionPolicy, now: Clock) -> None:
        self.policy = policy
        self._now = now
        self.state = EjectionState.SERVING
        self.since = now()
        self.until = 0.0
        self.consecutive_failures = 0
        self.times_ejected = 0
        self._last_ejection = 0.0
        self._probe_in_flight = False
        self._probe_started = 0.0
        self.transitions: dict[tuple[EjectionState, EjectionState], int] = {}
        self._lock = threading.Lock()

    def _move(self, state: EjectionState) -> None:
        key = (self.state, state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        self.state = state
        self.since = self._now()

    def _tick(self) -> None:
        now = self._now()
        if self.state is EjectionState.EJECTED and now >= self.until:
            self._move(EjectionState.PROBING)
            self._probe_in_flight = False
        elif self.state is EjectionState.PROBING and self._probe_in_flight and \
                now >= self._probe_started + self.policy.probe_timeout_s:
            self._eject()

    def serving(self) -> bool:
        """Whether searches may go to the endpoint (it is not ejected, nor being probed)."""
        with self._lock:
            self._tick()
            return self.state is EjectionState.SERVING

    def claim_probe(self) -> bool:
        """Whether to send a probe now (its ejection is over and no probe is out); the caller
        then sends one."""
        with self._lock:
            self._tick()
            if self.state is EjectionState.PROBING and not self._probe_in_flight:
                self._probe_in_flight = True
                self._probe_started = self._now()
                return True
            return False

    def on_success(self) -> None:
        with self._lock:
            self.consecutive_failures = 0
            if self.state is EjectionState.PROBING:
                self._probe_in_flight = False
                self._move(EjectionState.SERVING)

    def on_failure(self) -> bool:
        """Count a failure; ``True`` when it ejected the endpoint."""
        with self._lock:
            self.consecutive_failures += 1
            if self.state is EjectionState.PROBING or (
                self.state is EjectionState.SERVING
                and self.consecutive_failures >= self.policy.consecutive_failures
            ):
                self._eject()
                return True
            return False

    def probe_now(self) -> None:
        """New evidence that the endpoint may work again (its health turned SERVING after an
        outage, or a late answer arrived): end the ejection now, with a probe."""
        with self._lock:
            if self.state is EjectionState.EJECTED:
                self._move(EjectionState.PROBING)
                self._probe_in_flight = False

    def _eject(self) -> None:
        now = self._now()
        policy = self.policy
        if self.times_ejected:
            decayed = int((now - self._last_ejection) // policy.decay_interval_s)
            self.times_ejected = max(0, self.times_ejected - decayed)
        self.times_ejected += 1
        self._last_ejection = now
        self.until = now + min(
            policy.base_ejection_time_s * self.times_ejected, policy.max_ejection_time_s
        )
        self._probe_in_flight = False
        self._move(EjectionState.EJECTED)


class RetryThrottle:
    """gRPC A6 retry throttling: a token bucket per shard.

    Starts full at ``max_tokens``; a failed search takes one token, a successful one gives
    ``token_ratio`` back. Failovers and hedges are sent only while more than half remain.
    """

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 0.1) -> None:
        if max_tokens <= 0 or token_ratio <= 0:
            raise ValueError("max_tokens and token_ratio must be > 0")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = max_tokens
        self._lock = threading.Lock()

    def allows_more_attempts(self) -> bool:
        return self.tokens > self.max_tokens / 2

    def on_failure(self) -> None:
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1.0)

    def on_success(self) -> None:
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)


@dataclass(frozen=True)
class ReplicaPolicy:
    """Everything the client decides per shard and per endpoint, in one place.

    ``max_attempts``: searches sent per shard and step, the first included (failovers and
    hedges share it, as in A6). ``hedge_quantile``: a shard's search is hedged to a second
    replica once it has run longer than this quantile of the shard's recent latencies (never
    sooner than ``min_hedge_delay_s``). The adaptive deadline of a shard is
    ``deadline_factor`` x its recent p99, between ``min_deadline_s`` and the retriever's
    ``deadline_s``. ``max_in_flight``: searches outstanding on one endpoint (all sessions); an
    endpoint at the cap is passed over and, if every replica is, the shard is skipped for the
    step and counted as overflow (Envoy's circuit breaking). ``owed_timeout_s``: how long an
    endpoint with a search given up late and still unanswered is passed over (a stall then costs
    one deadline, not one per step). ``default_rtt_s``: the pessimistic latency of an endpoint
    never measured. ``search_port_retry_s``: how long an endpoint whose search port failed
    searches on its main port before its search port is tried again.
    """

    max_attempts: int = 3
    hedge_quantile: float = 0.95
    min_hedge_delay_s: float = 0.0005
    deadline_factor: float = 4.0
    # Not below 50 ms: a loaded host delays answers by tens of milliseconds now and then, and a
    # stall costs this once (an endpoint that owes an answer is passed over), not every step.
    min_deadline_s: float = 0.05
    max_in_flight: int = 64
    owed_timeout_s: float = 1.0
    default_rtt_s: float = 0.005
    ewma_decay_s: float = 2.0
    latency_window: int = 256
    min_latency_samples: int = 16
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)
    throttle_max_tokens: float = 10.0
    throttle_token_ratio: float = 0.1
    search_port_retry_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0 < self.hedge_quantile <= 1:
            raise ValueError("hedge_quantile must be in (0, 1]")
        if self.deadline_factor <= 0 or self.min_deadline_s <= 0:
            raise ValueError("deadline_factor and min_deadline_s must be > 0")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if self.search_port_retry_s <= 0:
            raise ValueError("search_port_retry_s must be > 0")


class ShardStats:
    """What a replica set (the endpoints serving one set of shards) has seen lately."""

    def __init__(self, policy: ReplicaPolicy) -> None:
        self.policy = policy
        self.latencies = LatencyWindow(policy.latency_window, policy.min_latency_samples)
        self.throttle = RetryThrottle(policy.throttle_max_tokens, policy.throttle_token_ratio)

    def hedge_delay(self) -> float | None:
        """How long the first search may run before a hedge goes out; ``None``: not enough
        observations yet to know what is slow."""
        p = self.latencies.quantile(self.policy.hedge_quantile)
        return None if p is None else max(p, self.policy.min_hedge_delay_s)

    def deadline(self, hard_deadline_s: float) -> float:
        """This shard's deadline for one step (seconds from the step's start)."""
        p99 = self.latencies.quantile(0.99)
        if p99 is None:
            return hard_deadline_s
        return min(hard_deadline_s, max(self.policy.min_deadline_s,
                                        self.policy.deadline_factor * p99))
