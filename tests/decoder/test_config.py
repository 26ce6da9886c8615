"""decoder/config.py: a frozen, validated configuration."""

from __future__ import annotations

import dataclasses

import pytest

from decoder import DecodingConfig


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
        dict(context_min_ngram=3, context_max_ngram=2),
        dict(merge="sum"),
        dict(retrieval_deadline_s=0),
    ],
)
def test_invalid_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        DecodingConfig(**kwargs)
