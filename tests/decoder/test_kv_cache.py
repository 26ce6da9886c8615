"""decoder/kv_cache.py: after a step, the cache is what feeding the accepted path gives."""

from __future__ import annotations

import pytest
import torch

from decoder.draft_tree import DraftTree
from decoder.kv_cache import cache_length, keep_accepted, new_cache
from decoder.verify import prefill, verify_tree
from tests.decoder.helpers import ARCHS, make_model

PREFIX = [11, 12, 13, 14]
ROOT = 20
# root -> 30 -> 31 -> 32; root -> 40 -> 41; 30 -> 50. Tree indices: 30=1, 31=2, 32=3, 40=4,
# 41=5, 50=6.
TREE = DraftTree([30, 31, 32, 40, 41, 50], [-1, 0, 1, -1, 3, 0], [1.0] * 6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "accepted, path",
    [([0, 4, 5], [40, 41]), ([0, 1, 6], [30, 50]), ([0, 1, 2], [30, 31]), ([0], [])],
)
def test_kept_cache_equals_the_sequential_cache(arch, accepted, path) -> None:
    model = make_model(arch)
    with torch.inference_mode():
        cache = new_cache()
        prefill(model, cache, PREFIX)
        verify_tree(model, cache, TREE.linearise(ROOT, len(PREFIX), model.dtype, "cpu"))
        assert cache_length(cache) == len(PREFIX) + 1 + len(TREE)
        keep_accepted(cache, len(PREFIX), accepted)

        reference = new_cache()
        prefill(model, reference, PREFIX + [ROOT] + path)
    assert cache_length(cache) == len(PREFIX) + len(accepted)
    for kept, want in zip(cache.layers, reference.layers):
        torch.testing.assert_close(kept.keys, want.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(kept.values, want.values, atol=1e-5, rtol=0)
