"""Comparing draft trees made by two implementations of the same rules (the engine and the
Python reference)."""

from __future__ import annotations

import pytest

from decoder.draft_tree import DraftTree


def assert_same_tree(engine: DraftTree, reference: DraftTree) -> None:
    """The same nodes in the same order, scores equal to float rounding. Where summation order
    makes two nearly tied nodes trade places at a budget cut, the kept scores still agree."""
    if engine.tokens == reference.tokens and engine.parents == reference.parents:
        assert engine.scores == pytest.approx(reference.scores, rel=1e-9, abs=1e-12)
        return
    assert sorted(engine.scores) == pytest.approx(sorted(reference.scores), rel=1e-9, abs=1e-12)
