"""The KV cache between steps: it holds exactly the context minus the root.

After a step, the cache also holds keys and values for every node of the verified tree; only the
root and the accepted path may stay, in that order, as if they had been fed one by one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    # Built without the model's config on purpose: a config with a sliding window would give
    # layers that drop old keys on their own, and the tree positions must stay addressable.
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def keep_accepted(cache: DynamicCache, prefix_len: int, accepted: Sequence[int]) -> None:
    """Keep the first ``prefix_len`` positions, then the tree positions ``accepted`` (tree indices,
    root = 0, in path order); drop everything else."""
    kept = prefix_len + len(accepted)
    if list(accepted) != list(range(len(accepted))):  # a chain needs no gather, only the crop
        index = torch.tensor(accepted, device=cache.layers[0].keys.device) + prefix_len
        for layer in cache.layers:
            # keys, values: [batch, kv_heads, prefix + n_tree, head_dim]; the right-hand side is
            # gathered into a copy before it is written, so overlapping ranges are safe.
            layer.keys[..., prefix_len:kept, :] = layer.keys.index_select(-2, index)
            layer.values[..., prefix_len:kept, :] = layer.values.index_select(-2, index)
    cache.crop(kept)
    assert cache_length(cache) == kept
