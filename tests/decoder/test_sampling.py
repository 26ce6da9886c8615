"""decoder/sampling.py: the processed target distribution and the one-uniform draw."""

from __future__ import annotations

import pytest
import torch

from decoder.sampling import SamplingParams, draw, node_chooser, processed_probs
from tests.decoder.helpers import chi_square_pvalue

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])


def test_temperature_then_top_k_then_top_p_as_transformers() -> None:
    # Worked by hand: temperature 2 halves the logits; top-k 4 keeps ids 5, 0, 1, 2;
    # top-p 0.8 then keeps the smallest set of those reaching 0.8: ids 5, 0, 1.
    probs = processed_probs(LOGITS, SamplingParams(temperature=2.0, top_k=4, top_p=0.8))[0]
    kept = torch.tensor([1.5, 1.0, 0.5])  # ids 5, 0, 1 after temperature
    want = torch.zeros(6)
    want[[5, 0, 1]] = torch.softmax(kept, 0)
    torch.testing.assert_close(probs, want)
    top4 = torch.softmax(torch.tensor([1.5, 1.0, 0.5, 0.25]), 0)
    assert top4[:2].sum() < 0.8 <= top4[:3].sum()  # why id 2 goes and id 1 stays


def test_no_filter_is_plain_softmax_at_temperature() -> None:
    probs = processed_probs(LOGITS, SamplingParams(temperature=0.5))
    torch.testing.assert_close(probs, torch.softmax(LOGITS / 0.5, -1))


def test_draw_never_picks_a_token_of_probability_zero() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    generator = torch.Generator().manual_seed(0)
    assert {draw(probs, generator) for _ in range(500)} == {1, 3}
    assert draw(torch.tensor([0.0, 0.0, 1.0]), generator) == 2


def test_draw_follows_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    generator = torch.Generator().manual_seed(1)
    samples = [draw(probs, generator) for _ in range(4000)]
    assert chi_square_pvalue(samples, {i: p.item() for i, p in enumerate(probs)}) > 0.01
    skewed = {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1}  # the test has the power to say no
    assert chi_square_pvalue(samples, skewed) < 1e-9


def test_draw_uses_exactly_one_uniform() -> None:
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    draw(torch.tensor([0.3, 0.7]), a)
    torch.rand(1, generator=b, dtype=torch.float64)
    assert torch.equal(a.get_state(), b.get_state())


def test_greedy_chooser_is_argmax_per_node_and_sampling_needs_a_generator() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    choose = node_chooser(logits, SamplingParams(), None)
    assert [choose(0), choose(1)] == [1, 0]
    with pytest.raises(ValueError, match="Generator"):
        node_chooser(logits, SamplingParams(temperature=1.0), None)
    sample = node_chooser(logits, SamplingParams(temperature=1.0, top_k=1), torch.Generator())
    assert [sample(0), sample(1)] == [1, 0]  # top-1 sampling is greedy


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)]
)
def test_invalid_sampling_parameters_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
