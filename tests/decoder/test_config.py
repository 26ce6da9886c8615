"""decoder/config.py: a frozen, validated configuration."""

from __future__ import annotations

import dataclasses

import pytest

from decoder import DecodingConfig, NgramParams


def test_defaults_draft_like_the_replay_benchmarks_decoder_policy() -> None:
    config = DecodingConfig()
    assert (config.search.min_span, config.search.max_span) == (1, 16)
    assert (config.search.budget, config.search.max_depth) == (64, 10)
    assert (config.retrieval_levels, config.retrieval_trust) == (3, 32.0)
    assert config.context_drafts and config.context == NgramParams(1, 4, 10, 32, 2.0)
    assert config.served_drafts and config.served == NgramParams(1, 4, 10, 64, 3.0)
    assert config.score_correction


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_ngram=3, max_ngram=2), dict(min_ngram=0), dict(max_length=0),
     dict(max_occurrences=0), dict(trust=-0.5)],
)  # fmt: skip
def test_invalid_ngram_params_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        NgramParams(**kwargs)


def test_defaults_use_the_adaptive_budget() -> None:
    config = DecodingConfig()
    assert config.adaptive and config.tree_budget == config.max_budget == 64
    fixed = DecodingConfig(budget=8)
    assert not fixed.adaptive and fixed.tree_budget == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(budget="big"),
        dict(budget=-1),
        dict(max_budget=0),
        dict(retrieval_levels=0),
        dict(retrieval_trust=-1.0),
        dict(served_max_tokens=0),
        dict(score_correction_decay=1.0),
        dict(retrieval_deadline_s=0),
    ],
)
def test_invalid_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        DecodingConfig(**kwargs)


def test_reproducible_settings_leave_nothing_to_timing_or_history() -> None:
    config = DecodingConfig(reproducible=True).resolved()
    assert not config.adaptive and config.tree_budget == 16
    assert not config.served_drafts and config.retrieval_deadline_s is None
    assert DecodingConfig(budget=8, reproducible=True).resolved().tree_budget == 8
    assert DecodingConfig().resolved() == DecodingConfig()
