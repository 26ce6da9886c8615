"""decoder/sampling.py: transformers' processed scores at each node, and the one-uniform draw."""

from __future__ import annotations

import pytest
import torch

from decoder.sampling import draw, node_chooser, node_paths, processed_scores
from decoder.settings import resolve_settings
from tests.decoder.helpers import chi_square_pvalue, make_model

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])


def settings_for(**options):
    return resolve_settings(make_model("llama"), [5], None, options)


def test_temperature_then_top_k_then_top_p_as_transformers() -> None:
    # Worked by hand: temperature 2 halves the logits; top-k 4 keeps ids 5, 0, 1, 2;
    # top-p 0.8 then keeps the smallest set of those reaching 0.8: ids 5, 0, 1.
    settings = settings_for(temperature=2.0, top_k=4, top_p=0.8)
    probs = torch.softmax(processed_scores(settings.processors, torch.tensor([[5]]), LOGITS)[0], 0)
    kept = torch.tensor([1.5, 1.0, 0.5])  # ids 5, 0, 1 after temperature
    want = torch.zeros(6)
    want[[5, 0, 1]] = torch.softmax(kept, 0)
    torch.testing.assert_close(probs, want)
    top4 = torch.softmax(torch.tensor([1.5, 1.0, 0.5, 0.25]), 0)
    assert top4[:2].sum() < 0.8 <= top4[:3].sum()  # why id 2 goes and id 1 stays


def test_top_k_50_is_the_default_of_sampling_as_in_transformers() -> None:
    names = [type(p).__name__ for p in settings_for(temperature=0.5).processors]
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper"]
    assert settings_for(temperature=0.5).processors[1].top_k == 50
    assert [type(p).__name__ for p in settings_for(temperature=0.5, top_k=0).processors] == [
        "TemperatureLogitsWarper"
    ]


def test_repetition_penalty_sees_each_nodes_own_history() -> None:
    # A node's history is the context plus its path: the penalty applies to the tokens on that
    # path, not to its siblings'.
    settings = settings_for(repetition_penalty=100.0)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 3)  # root, node 1 (token 3), node 2 (token 2)
    context = torch.tensor([0])
    choose = node_chooser(logits, context, [3, 2], [-1, -1], settings.processors, True, None)
    assert [choose(0), choose(1), choose(2)] == [3, 2, 3]
    assert node_paths([3, 2, 7], [-1, -1, 1]) == [[], [3], [2], [2, 7]]


def test_processed_scores_never_modify_the_logits() -> None:
    settings = settings_for(repetition_penalty=2.0)
    logits = LOGITS.clone()
    processed_scores(settings.processors, torch.tensor([[5, 0]]), logits)
    torch.testing.assert_close(logits, LOGITS)


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
    context = torch.tensor([1])
    choose = node_chooser(logits, context, [1], [-1], settings_for().processors, True, None)
    assert [choose(0), choose(1)] == [1, 0]
    sample = settings_for(do_sample=True, top_k=1)
    with pytest.raises(ValueError, match="Generator"):
        node_chooser(logits, context, [1], [-1], sample.processors, False, None)
    choose = node_chooser(logits, context, [1], [-1], sample.processors, False, torch.Generator())
    assert [choose(0), choose(1)] == [1, 0]  # top-1 sampling is greedy
