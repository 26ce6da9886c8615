"""The adaptive budget: how many draft nodes a step should verify.

A step that verifies the ``n`` best nodes emits, in expectation, ``1 + sum of their scores``
tokens (the bonus token, plus each node's probability of lying on the accepted path) and costs
``cost(n + 1)`` seconds of forward pass (the root is fed too) on top of the retrieval time already
spent. The budget is the ``n`` maximising tokens per second; ``cost`` is measured once per
generator on the actual model and device (``calibrate``). Scores are estimates, and some sources
are over-confident: ``ScoreCorrection`` rescales them by what recent steps actually accepted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from decoder.kv_cache import BatchedCache
from decoder.model_support import ModelProfile
from decoder.verify import RowTree, build_tree_batch, forward_plain, forward_tree_batch, prefill


@dataclass(frozen=True)
class CostModel:
    """Seconds of one verification forward pass, measured at some tree sizes (root included)
    and interpolated linearly in between (extrapolated from the last two beyond)."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) < 2 or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError("a CostModel needs at least two increasing sizes")
        if len(self.seconds) != len(self.sizes):
            raise ValueError("a CostModel needs one time per size")

    def cost(self, n_tokens: np.ndarray | int) -> np.ndarray:
        sizes = np.asarray(self.sizes, dtype=np.float64)
        seconds = np.asarray(self.seconds, dtype=np.float64)
        n = np.asarray(n_tokens, dtype=np.float64)
        slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
        inside = np.interp(n, sizes, seconds)
        return np.where(n > sizes[-1], seconds[-1] + slope * (n - sizes[-1]), inside)


def choose_budget(
    ranked_scores: Sequence[float], cost: CostModel, retrieval_s: float, max_budget: int
) -> int:
    """The number of best-ranked nodes that maximises expected tokens per second.

    Ties go to the smaller tree (less work for the same expected speed).
    """
    k = min(len(ranked_scores), max_budget)
    gain = 1.0 + np.concatenate([[0.0], np.cumsum(ranked_scores[:k])])  # [k + 1]
    seconds = cost.cost(np.arange(1, k + 2)) + retrieval_s  # [k + 1]
    return int(np.argmax(gain / seconds))  # argmax returns the first maximum


class ScoreCorrection:
    """How far the draft scores are borne out, learnt online.

    A step whose verified nodes score ``s_i`` predicts ``sum(s_i)`` accepted draft nodes (the
    scores estimate path probabilities); it accepts some number ``a``. Both are summed over the
    steps, older ones forgotten by ``decay`` per step, and ``factor = (accepted + prior) /
    (predicted + prior)``: 1 while there is little evidence, below 1 for over-confident drafts,
    above 1 for timid ones. ``correct`` scales scores by it (capped at 1) before the budget is
    chosen; the ranking of nodes does not change, only how many are worth verifying.
    """

    def __init__(self, decay: float = 0.9, prior: float = 1.0) -> None:
        if not 0 <= decay < 1 or prior <= 0:
            raise ValueError("need 0 <= decay < 1 and prior > 0")
        self.decay = decay
        self.prior = prior
        self.predicted = 0.0
        self.accepted = 0.0

    @property
    def factor(self) -> float:
        return (self.accepted + self.prior) / (self.predicted + self.prior)

    def observe(self, predicted: float, accepted: int) -> None:
        """One step: the sum of its verified nodes' (uncorrected) scores, the nodes accepted.

        A step that verified nothing counts too: the evidence fades, and a factor that had
        shrunk the budget to nothing drifts back towards 1 until drafts are tried again.
        """
        self.predicted = self.decay * self.predicted + predicted
        self.accepted = self.decay * self.accepted + accepted

    def correct(self, scores: Sequence[float]) -> list[float]:
        factor = self.factor
        return [min(score * factor, 1.0) for score in scores]


def _batch_rates(
    ranked_scores: Sequence[Sequence[float]], cost: CostModel, retrieval_s: float, max_budget: int
) -> np.ndarray:
    """Expected tokens per second of a batch step for every cap ``0..k`` on its rows' trees
    (``k``: the longest tree, at most ``max_budget``): each row gains ``1 + the sum of its kept
    scores``, the pass costs ``cost(widest + 1)`` (rows are padded to the widest tree) plus
    ``retrieval_s``."""
    longest = min(max((len(s) for s in ranked_scores), default=0), max_budget)
    caps = np.arange(longest + 1)  # [k + 1]
    gain = np.zeros(longest + 1)
    widest = np.zeros(longest + 1)
    for scores in ranked_scores:
        kept = np.minimum(caps, len(scores))
        cumulative = np.concatenate([[0.0], np.cumsum(scores[:longest])])
        gain += 1.0 + cumulative[kept]
        widest = np.maximum(widest, kept)
    return gain / (cost.cost(widest + 1) + retrieval_s)  # [k + 1]


class CostCorrection:
    """What real steps cost beyond what the calibrated ``CostModel`` predicts, learnt online per
    batch size.

    Calibration times forward passes after a short prefix, at one moment. A real step also builds
    its masks, walks its trees and moves the accepted entries in the KV cache, over contexts that
    grow as the outputs do (longer cache copies and attention for every row), on a machine whose
    load changes. That extra is mostly per step and per row, not per tree token: each step of a
    batch size adds its measured verification time and the time its batch size's cost model
    predicted for it (forgetting older steps by ``decay`` per step), and ``extra_s`` is the
    difference of the two sums over the steps (0 before any step). ``correct`` adds it to every
    tree size. Steps cheaper than predicted mean a calibration under heavier load than now:
    then every size is scaled by measured / predicted instead (a negative extra would make small
    trees look cheaper than they are relative to large ones).
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0 <= decay < 1:
            raise ValueError("need 0 <= decay < 1")
        self.decay = decay
        # batch size -> (steps, predicted seconds, measured seconds), decayed sums
        self._sums: dict[int, tuple[float, float, float]] = {}

    def extra_s(self, batch_size: int) -> float:
        steps, predicted, measured = self._sums.get(batch_size, (0.0, 0.0, 0.0))
        return (measured - predicted) / steps if steps else 0.0

    def observe(self, batch_size: int, predicted_s: float, measured_s: float) -> None:
        steps, predicted, measured = self._sums.get(batch_size, (0.0, 0.0, 0.0))
        d = self.decay
        self._sums[batch_size] = (d * steps + 1, d * predicted + predicted_s,
                                  d * measured + measured_s)  # fmt: skip

    def correct(self, batch_size: int, cost: CostModel) -> CostModel:
        steps, predicted, measured = self._sums.get(batch_size, (0.0, 0.0, 0.0))
        if not steps or measured == predicted or predicted <= 0:
            return cost
        if measured > predicted:
            extra = (measured - predicted) / steps
            return CostModel(cost.sizes, tuple(s + extra for s in cost.seconds))
        return CostModel(cost.sizes, tuple(s * measured / predicted for s in cost.seconds))


def choose_batch_budget(
    ranked_scores: Sequence[Sequence[float]], cost: CostModel, retrieval_s: float, max_budget: int
) -> int:
    """The cap ``n`` on every row's tree (its ``n`` best nodes) that maximises expected tokens per
    second for a batch verified in one forward pass.

    The rows are padded to the widest tree, so the pass costs ``cost(widest + 1)`` for the whole
    batch (``cost`` is measured at this batch size); each row gains ``1 + the sum of its kept
    scores``. As the batch fills, a node costs more, and the cap shrinks, down to 0 (plain steps)
    when no draft pays for its verification. For one row this is ``choose_budget``.

    ``retrieval_s`` is the drafting time already spent: it is the same for every cap, so it makes
    the forward pass relatively cheaper and the trees larger. Whether drafting was worth its time
    at all is ``drafting_pays``'s question.
    """
    return int(np.argmax(_batch_rates(ranked_scores, cost, retrieval_s, max_budget)))


def drafting_pays(
    ranked_scores: Sequence[Sequence[float]], cost: CostModel, retrieval_s: float, cap: int
) -> bool:
    """Whether a step that drafted (for ``retrieval_s`` seconds) and verifies its rows' ``cap``
    best nodes is expected to emit tokens faster than a plain step of the same rows would have:
    one token per row in ``cost(1)`` seconds, without the drafting time. A cap of 0 never pays
    (the drafting time was spent for nothing)."""
    rows = len(ranked_scores)
    if rows == 0 or cap == 0:
        return False
    rate = _batch_rates(ranked_scores, cost, retrieval_s, cap)[-1]
    return bool(rate > rows / float(cost.cost(1)))


class DraftingGate:
    """Whether a step of a given batch size drafts at all.

    A step's drafting phase costs its wall time before any budget is chosen, and a cap of 0 does
    not give that time back: once drafting stops paying (as the batch fills, a draft node costs
    more verification, while every row still pays for its own drafting), the phase itself must
    be skipped. After a step that drafted and did not pay (``drafting_pays``), the next ``wait``
    steps of that batch size skip drafting (plain steps); then one step drafts again, a probe. A
    probe that does not pay doubles the wait, up to ``max_wait``; a step that pays resets it to
    ``first_wait``. Batch sizes are kept apart: drafting that does not pay for 16 rows may pay
    for 4.
    """

    def __init__(self, first_wait: int = 4, max_wait: int = 64) -> None:
        if not 1 <= first_wait <= max_wait:
            raise ValueError("need 1 <= first_wait <= max_wait")
        self.first_wait = first_wait
        self.max_wait = max_wait
        self._skip: dict[int, int] = {}  # batch size -> steps left to skip
        self._wait: dict[int, int] = {}  # batch size -> the wait after the next failed probe

    def opens(self, batch_size: int) -> bool:
        """Whether a step of ``batch_size`` rows drafts; a closed gate counts the step skipped."""
        left = self._skip.get(batch_size, 0)
        if left > 0:
            self._skip[batch_size] = left - 1
            return False
        return True

    def observe(self, batch_size: int, paid: bool) -> None:
        """The verdict of a step of ``batch_size`` rows that drafted."""
        if paid:
            self._wait[batch_size] = self.first_wait
            self._skip[batch_size] = 0
            return
        wait = self._wait.get(batch_size, self.first_wait)
        self._skip[batch_size] = wait
        self._wait[batch_size] = min(2 * wait, self.max_wait)

    def skipping(self, batch_size: int) -> int:
        """Steps of ``batch_size`` rows left to skip."""
        return self._skip.get(batch_size, 0)


def calibration_sizes(max_budget: int) -> tuple[int, ...]:
    """Tree sizes in tokens: 1, 2, 4, ... and the largest tree (``max_budget`` nodes + root)."""
    sizes = {1, 2, max_budget + 1}
    size = 4
    while size <= max_budget:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


@torch.inference_mode()
def calibrate(
    model: torch.nn.Module,
    profile: ModelProfile,
    max_budget: int,
    batch_size: int = 1,
    prefix_len: int = 32,
    repeats: int = 3,
) -> CostModel:
    """Time verification forward passes of ``batch_size`` rows for every calibration size after a
    ``prefix_len`` prefix, through the decoder's own step (a batch of one without drafts takes the
    plain path, as decoding does).

    The trees are chains (the shape does not change the work of a forward pass). After one
    warm-up round, ``repeats`` rounds time every size in turn, so that a burst of load elsewhere
    hits all sizes alike; each size keeps its fastest run. A smaller tree never costs more than a
    larger one, so a measured inversion is noise and is capped.
    """
    vocab = model.get_input_embeddings().num_embeddings
    tokens = [(7 * i + 1) % vocab for i in range(prefix_len + max_budget + 1)]
    kv = BatchedCache()
    single, _ = prefill(model, tokens[:prefix_len])
    for _ in range(batch_size):
        kv.append(_copy_cache(single), prefix_len)
    sizes = calibration_sizes(max_budget)
    rows = [RowTree(tokens[prefix_len], tokens[prefix_len + 1 : prefix_len + size],
                    list(range(-1, size - 2))) for size in sizes]  # fmt: skip
    best = np.full(len(sizes), np.inf)
    for round_ in range(repeats + 1):
        for i, row in enumerate(rows):
            start = time.perf_counter()
            width = kv.width
            if batch_size == 1 and len(row) == 1:
                forward_plain(model, kv, row.root)
            else:
                batch = build_tree_batch([row] * batch_size, kv.lengths, width, profile,
                                         model.dtype, model.device)  # fmt: skip
                forward_tree_batch(model, profile, kv, batch)
            synchronize(model.device)
            if round_ > 0:
                best[i] = min(best[i], time.perf_counter() - start)
            kv.commit(width, [[] for _ in range(batch_size)])
    monotone = np.minimum.accumulate(best[::-1])[::-1]
    return CostModel(sizes, tuple(float(s) for s in monotone))


def _copy_cache(cache):
    from copy import deepcopy

    return deepcopy(cache)


class BatchCostModel:
    """A ``CostModel`` per batch size: measured (``calibrate``) at batch sizes 1, 2, 4, 8, ...
    the first time a batch needs one, and interpolated linearly in between.

    A forward pass over ``rows`` trees of ``n`` tokens costs about a fixed time plus a time per
    token fed, so at a given tree size its cost is close to linear in the rows. Measuring every
    batch size instead would stall the batch at each new size (at 16 rows and the largest trees
    a calibration runs thousands of tokens through the model), and a batch that shrinks as its
    requests finish passes through every size.
    """

    def __init__(self, model: torch.nn.Module, profile: ModelProfile, max_budget: int,
                 prefix_len: int = 32, repeats: int = 3) -> None:  # fmt: skip
        self.model = model
        self.profile = profile
        self.max_budget = max_budget
        self.prefix_len = prefix_len
        self.repeats = repeats
        self.by_batch_size: dict[int, CostModel] = {}  # measured (or set)
        self._between: dict[int, tuple[CostModel, CostModel, CostModel]] = {}

    def for_batch(self, batch_size: int) -> CostModel:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size in self.by_batch_size:
            return self.by_batch_size[batch_size]
        lower = 1 << (batch_size.bit_length() - 1)  # the largest power of two <= batch_size
        if lower == batch_size:
            return self._measured(batch_size)
        low, high = self._measured(lower), self._measured(2 * lower)
        known = self._between.get(batch_size)
        if known is None or known[0] is not low or known[1] is not high:
            known = (low, high, interpolate(low, high, (batch_size - lower) / lower))
            self._between[batch_size] = known
        return known[2]

    def known(self, batch_size: int) -> CostModel | None:
        """``for_batch(batch_size)`` if that needs no measurement, else None."""
        lower = 1 << (batch_size.bit_length() - 1)
        if batch_size in self.by_batch_size or (
            lower in self.by_batch_size and 2 * lower in self.by_batch_size
        ):
            return self.for_batch(batch_size)
        return None

    def _measured(self, batch_size: int) -> CostModel:
        if batch_size not in self.by_batch_size:
            self.by_batch_size[batch_size] = calibrate(
                self.model, self.profile, self.max_budget, batch_size, self.prefix_len,
                self.repeats,
            )  # fmt: skip
        return self.by_batch_size[batch_size]

    def measure_up_to(self, max_batch: int) -> None:
        """Measure every batch size ``for_batch`` can need for batches of up to ``max_batch``
        rows now (a server does, before it takes requests) rather than on first use."""
        size = 1
        while size < 2 * max_batch:
            self._measured(size)
            size *= 2


def interpolate(low: CostModel, high: CostModel, fraction: float) -> CostModel:
    """The cost model ``fraction`` of the way from ``low`` to ``high`` (at the sizes of both)."""
    sizes = tuple(sorted(set(low.sizes) | set(high.sizes)))
    at = np.asarray(sizes)
    seconds = (1 - fraction) * low.cost(at) + fraction * high.cost(at)
    return CostModel(sizes, tuple(float(x) for x in seconds))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
