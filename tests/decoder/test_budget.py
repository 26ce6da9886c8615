"""decoder/budget.py: the adaptive budget maximises expected tokens per second."""

from __future__ import annotations

import numpy as np
import pytest

from decoder.budget import (
    BatchCostModel,
    CostCorrection,
    CostModel,
    DraftingGate,
    ScoreCorrection,
    calibrate,
    calibration_sizes,
    choose_batch_budget,
    choose_budget,
    drafting_pays,
)
from decoder.model_support import profile_model
from tests.decoder.helpers import make_model

# A device where up to 4 tokens cost the same (1 ms), then every token costs 0.25 ms more.
FLAT_THEN_LINEAR = CostModel((1, 2, 4, 8, 16), (1e-3, 1e-3, 1e-3, 2e-3, 4e-3))


def test_cost_model_interpolates_and_extrapolates() -> None:
    cost = FLAT_THEN_LINEAR.cost(np.array([1, 3, 6, 16, 20]))
    np.testing.assert_allclose(cost, [1e-3, 1e-3, 1.5e-3, 4e-3, 5e-3])
    with pytest.raises(ValueError):
        CostModel((4, 2), (1.0, 2.0))
    with pytest.raises(ValueError):
        CostModel((1, 2), (1.0,))


def test_free_nodes_are_always_worth_verifying() -> None:
    # Trees of up to 3 nodes (4 tokens) cost what the root alone costs: take them all, even
    # unlikely ones.
    assert choose_budget([0.9, 0.05, 0.01], FLAT_THEN_LINEAR, 0.0, 64) == 3


def test_costly_nodes_must_pay_for_themselves() -> None:
    # Node 4 and beyond cost 0.25 ms each: worth it while their score beats the current rate.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.01, 0.01]
    # n=3: 3.4 / 1.0 ms; n=4: 4.0 / 1.25 ms = 3.2 -> stop at 3 ... unless retrieval is slow,
    # which makes each extra forward-pass millisecond relatively cheaper.
    assert choose_budget(scores, FLAT_THEN_LINEAR, 0.0, 64) == 3
    assert choose_budget(scores, FLAT_THEN_LINEAR, 5e-3, 64) == 5


def test_budget_is_capped_and_ties_go_to_the_smaller_tree() -> None:
    assert choose_budget([1.0] * 10, FLAT_THEN_LINEAR, 0.0, 2) == 2
    assert choose_budget([0.0] * 3, FLAT_THEN_LINEAR, 0.0, 64) == 0
    assert choose_budget([], FLAT_THEN_LINEAR, 0.0, 64) == 0


def test_calibration_sizes_cover_the_range() -> None:
    assert calibration_sizes(64) == (1, 2, 4, 8, 16, 32, 64, 65)
    assert calibration_sizes(10) == (1, 2, 4, 8, 11)
    assert calibration_sizes(1) == (1, 2)


def test_calibrate_times_every_size_on_the_model() -> None:
    model = make_model("llama")
    cost = calibrate(model, profile_model(model), max_budget=8, prefix_len=4, repeats=1)
    assert cost.sizes == (1, 2, 4, 8, 9)
    assert all(0 < s < 1.0 for s in cost.seconds)
    assert list(cost.seconds) == sorted(cost.seconds)  # noise never makes a smaller tree dearer
    batched = calibrate(model, profile_model(model), 8, batch_size=3, prefix_len=4, repeats=1)
    assert batched.sizes == cost.sizes and all(0 < s < 1.0 for s in batched.seconds)


def test_batch_cost_models_are_measured_once_per_batch_size() -> None:
    model = make_model("llama")
    costs = BatchCostModel(model, profile_model(model), max_budget=4, prefix_len=4, repeats=1)
    first = costs.for_batch(2)
    assert costs.for_batch(2) is first and set(costs.by_batch_size) == {2}
    costs.for_batch(3)  # between two measured sizes
    assert set(costs.by_batch_size) == {2, 4}
    costs.measure_up_to(5)
    assert set(costs.by_batch_size) == {1, 2, 4, 8}


def test_batch_sizes_between_powers_of_two_are_interpolated() -> None:
    costs = BatchCostModel(None, None, max_budget=64)  # type: ignore[arg-type]  # never measures
    costs.by_batch_size[8] = CostModel((1, 65), (2e-3, 10e-3))
    costs.by_batch_size[16] = CostModel((1, 9, 65), (3e-3, 5e-3, 18e-3))
    twelve = costs.for_batch(12)
    assert twelve.sizes == (1, 9, 65)
    np.testing.assert_allclose(twelve.seconds, [2.5e-3, (3e-3 + 5e-3) / 2, 14e-3])
    assert costs.for_batch(12) is twelve and costs.for_batch(16) is costs.by_batch_size[16]
    costs.by_batch_size[16] = FLAT_THEN_LINEAR  # a new measurement replaces the interpolation
    assert costs.for_batch(12).seconds[0] == pytest.approx(1.5e-3)
    with pytest.raises(ValueError):
        costs.for_batch(0)


# --- the budget of a batch ---------------------------------------------------------------------


def test_a_batch_of_one_chooses_as_a_single_sequence() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.01, 0.01]
    for retrieval_s in (0.0, 5e-3):
        assert choose_batch_budget([scores], FLAT_THEN_LINEAR, retrieval_s, 64) == choose_budget(
            scores, FLAT_THEN_LINEAR, retrieval_s, 64
        )


def test_trees_shrink_as_the_batch_fills_down_to_none() -> None:
    # Per-token cost grows with the batch: 1 ms for the pass, then 0.1 ms per token and row.
    def cost_for(rows: int) -> CostModel:
        return CostModel((1, 65), (1e-3 + rows * 1e-4, 1e-3 + rows * 65e-4))

    scores = [0.6, 0.4, 0.3, 0.2, 0.1, 0.05]
    caps = [choose_batch_budget([scores] * rows, cost_for(rows), 0.0, 64) for rows in (1, 4, 16, 64)]
    assert caps[0] > 0 and caps[-1] == 0
    assert caps == sorted(caps, reverse=True)


def test_a_row_without_drafts_does_not_hold_the_others_back() -> None:
    # The pass costs what its widest tree costs; a row with nothing to verify adds its bonus
    # token to every choice alike.
    assert choose_batch_budget([[0.9] * 10, []], FLAT_THEN_LINEAR, 0.0, 64) == choose_budget(
        [0.9] * 10, FLAT_THEN_LINEAR, 0.0, 64
    ) > 0


# --- the online correction of scores ----------------------------------------------------------


def test_correction_starts_at_one_and_follows_what_steps_accept() -> None:
    correction = ScoreCorrection(decay=0.9, prior=1.0)
    assert correction.factor == 1.0
    assert correction.correct([0.5, 2.0]) == [0.5, 1.0]  # capped at 1
    correction.observe(predicted=4.0, accepted=0)
    assert correction.factor == pytest.approx(1 / 5)
    correction.observe(predicted=4.0, accepted=0)
    assert correction.factor == pytest.approx(1 / (1 + 4 * 0.9 + 4))
    timid = ScoreCorrection(decay=0.9)
    timid.observe(predicted=0.5, accepted=3)
    assert timid.factor == pytest.approx(4 / 1.5)


def test_evidence_fades_when_nothing_is_verified() -> None:
    correction = ScoreCorrection(decay=0.5)
    correction.observe(predicted=10.0, accepted=0)
    low = correction.factor
    for _ in range(10):
        correction.observe(predicted=0.0, accepted=0)
    assert low < 0.1 and correction.factor > 0.95


def test_over_confident_scores_shrink_the_chosen_budget_step_by_step() -> None:
    # Linear cost: 1 ms for the root, 0.1 ms per node. Ten nodes claiming certainty, never right.
    cost = CostModel((1, 65), (1e-3, 1e-3 + 64e-4))
    scores = [1.0] * 10
    correction = ScoreCorrection(decay=0.9)
    budgets = []
    for _ in range(5):
        budget = choose_budget(correction.correct(scores), cost, 0.0, 64)
        budgets.append(budget)
        correction.observe(predicted=sum(scores[:budget]), accepted=0)
    assert budgets[0] == 10  # believed at first
    assert budgets[1] == 0 and max(budgets[1:]) <= 3  # then hardly, now and then tried again


# --- whether drafting pays at all ---------------------------------------------------------------


def test_drafting_pays_only_when_it_beats_a_plain_step_with_its_time_counted() -> None:
    # Linear cost at some batch size: 2 ms for the pass, 0.1 ms per token of the widest row.
    cost = CostModel((1, 65), (2e-3, 2e-3 + 64e-4))
    rows = [[0.8, 0.6, 0.4]] * 4  # a plain step: 4 tokens in 2 ms, 2,000 tokens/s
    cap = choose_batch_budget(rows, cost, 0.0, 64)
    assert cap == 3 and drafting_pays(rows, cost, 0.0, cap)  # 11.2 tokens in 2.3 ms
    # The same trees after 4 ms of drafting: the budget still keeps them (the time is spent, and
    # they are the best use of the step), but the step is slower than a plain one.
    cap = choose_batch_budget(rows, cost, 4e-3, 64)
    assert cap == 3 and not drafting_pays(rows, cost, 4e-3, cap)
    assert not drafting_pays(rows, cost, 0.0, 0)  # no drafts kept: drafting was wasted
    assert not drafting_pays([], cost, 0.0, 3)


def test_a_closed_gate_skips_drafting_then_probes_again_later_and_later() -> None:
    gate = DraftingGate(first_wait=2, max_wait=8)

    def run(batch_size: int, steps: int, paid: bool) -> str:
        """'d' for a step that drafts (its verdict ``paid``), '.' for one that skips."""
        marks = ""
        for _ in range(steps):
            if gate.opens(batch_size):
                gate.observe(batch_size, paid)
                marks += "d"
            else:
                marks += "."
        return marks

    assert run(16, 4, paid=True) == "dddd"  # drafting pays: every step drafts
    # It stops paying: skip 2, probe, skip 4, probe, skip 8, probe, skip 8 (the longest wait).
    assert run(16, 28, paid=False) == "d..d....d........d........d."
    assert run(4, 3, paid=True) == "ddd"  # another batch size has a gate of its own
    assert gate.skipping(16) == 7 and gate.skipping(4) == 0


def test_a_probe_that_pays_reopens_the_gate() -> None:
    gate = DraftingGate(first_wait=2, max_wait=8)
    gate.observe(16, paid=False)
    gate.observe(16, paid=False)  # a failed probe: the next wait doubles
    assert gate.skipping(16) == 4
    gate.observe(16, paid=True)
    assert gate.skipping(16) == 0 and gate.opens(16)
    gate.observe(16, paid=False)
    assert gate.skipping(16) == 2  # back to the first wait
    with pytest.raises(ValueError):
        DraftingGate(first_wait=0)


def test_the_cost_correction_adds_what_steps_cost_beyond_the_model() -> None:
    correction = CostCorrection(decay=0.5)
    assert correction.extra_s(16) == 0.0
    assert correction.correct(16, FLAT_THEN_LINEAR) is FLAT_THEN_LINEAR
    correction.observe(16, predicted_s=1e-3, measured_s=3e-3)  # a step took 2 ms more
    assert correction.extra_s(16) == pytest.approx(2e-3) and correction.extra_s(4) == 0.0
    np.testing.assert_allclose(correction.correct(16, FLAT_THEN_LINEAR).seconds,
                               [3e-3, 3e-3, 3e-3, 4e-3, 6e-3])  # fmt: skip
    correction.observe(16, predicted_s=2e-3, measured_s=2e-3)  # the older step weighs half
    assert correction.extra_s(16) == pytest.approx(0.5 * 2e-3 / 1.5)
    faster = CostCorrection()
    faster.observe(16, predicted_s=4e-3, measured_s=1e-3)  # calibrated under heavier load
    np.testing.assert_allclose(faster.correct(16, FLAT_THEN_LINEAR).seconds,
                               [0.25e-3, 0.25e-3, 0.25e-3, 0.5e-3, 1e-3])  # scaled  # fmt: skip


def test_per_step_costs_beyond_the_forward_pass_weigh_on_plain_steps_too() -> None:
    # 4 ms for the pass, 1 ms per token of the widest row, 4 ms of drafting. Against the
    # calibrated passes alone, drafting does not pay; once steps are seen to cost 4 ms more than
    # that, with or without drafts, a plain step is slower too and the drafts pay.
    cost = CostModel((1, 65), (4e-3, 4e-3 + 64e-3))
    rows = [[0.9, 0.5, 0.3, 0.2, 0.1]] * 8
    correction = CostCorrection()
    cap = choose_batch_budget(rows, correction.correct(8, cost), 4e-3, 64)
    assert cap == 3 and not drafting_pays(rows, correction.correct(8, cost), 4e-3, cap)
    correction.observe(8, predicted_s=5e-3, measured_s=9e-3)
    corrected = correction.correct(8, cost)
    cap = choose_batch_budget(rows, corrected, 4e-3, 64)
    assert cap == 4 and drafting_pays(rows, corrected, 4e-3, cap)
