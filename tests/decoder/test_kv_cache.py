"""decoder/kv_cache.py: after a step, each row holds what feeding its accepted path gives."""

from __future__ import annotations

import pytest
import torch

from decoder.kv_cache import BatchedCache
from decoder.model_support import profile_model
from decoder.verify import RowTree, build_tree_batch, forward_tree_batch, prefill
from tests.decoder.helpers import ARCHS, make_model

PREFIXES = [[11, 12, 13, 14], [21, 22], [31, 32, 33, 34, 35, 36]]
ROOTS = [20, 25, 37]
# root -> 30 -> 31 -> 32; root -> 40 -> 41; 30 -> 50. Tree indices: 30=1, 31=2, 32=3, 40=4,
# 41=5, 50=6.
TREE = RowTree(20, [30, 31, 32, 40, 41, 50], [-1, 0, 1, -1, 3, 0])
PATHS = {(0, 4, 5): [40, 41], (0, 1, 6): [30, 50], (0, 1, 2): [30, 31], (0,): []}


def row_entries(kv: BatchedCache, row: int, layer) -> tuple[torch.Tensor, torch.Tensor]:
    n = kv.lengths[row]
    return layer.keys[row, :, :n], layer.values[row, :, :n]


def assert_rows_hold(model, kv: BatchedCache, sequences: list[list[int]]) -> None:
    assert kv.lengths == [len(s) for s in sequences] and kv.width == max(kv.lengths)
    for row, sequence in enumerate(sequences):
        reference, _ = prefill(model, sequence)
        for layer, want in zip(kv.cache.layers, reference.layers):
            keys, values = row_entries(kv, row, layer)
            torch.testing.assert_close(keys, want.keys[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(values, want.values[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_committed_rows_equal_the_sequential_cache(arch) -> None:
    model = make_model(arch)
    profile = profile_model(model)
    accepted = [(0, 4, 5), (0, 1, 6), (0,)]
    with torch.inference_mode():
        kv = BatchedCache()
        for prefix in PREFIXES:
            kv.append(prefill(model, prefix)[0], len(prefix))
        rows = [RowTree(root, TREE.tokens, TREE.parents) for root in ROOTS]
        width = kv.width
        batch = build_tree_batch(rows, kv.lengths, width, profile, model.dtype, "cpu")
        forward_tree_batch(model, profile, kv, batch)
        assert kv.cache.get_seq_length() == width + len(TREE)
        kv.commit(width, accepted)
        assert_rows_hold(model, kv, [p + [r] + PATHS[a]
                                     for p, r, a in zip(PREFIXES, ROOTS, accepted)])  # fmt: skip


def test_rows_join_and_leave() -> None:
    model = make_model("llama")
    with torch.inference_mode():
        kv = BatchedCache()
        for prefix in PREFIXES:
            kv.append(prefill(model, prefix)[0], len(prefix))
        assert_rows_hold(model, kv, PREFIXES)
        kv.keep_rows([1, 0])  # the longest leaves: the cache narrows to the longest left
        assert_rows_hold(model, kv, [PREFIXES[1], PREFIXES[0]])
        longer = list(range(3, 12))
        kv.append(prefill(model, longer)[0], len(longer))  # a longer one joins: the others pad
        assert_rows_hold(model, kv, [PREFIXES[1], PREFIXES[0], longer])
        kv.replace(0, prefill(model, [7, 8, 9])[0], 3)
        assert_rows_hold(model, kv, [[7, 8, 9], PREFIXES[0], longer])
        kv.keep_rows([])
        assert len(kv) == 0 and kv.width == 0


def test_a_chain_accepted_by_a_single_full_row_is_only_cropped() -> None:
    model = make_model("qwen3")
    profile = profile_model(model)
    with torch.inference_mode():
        kv = BatchedCache()
        kv.append(prefill(model, PREFIXES[0])[0], 4)
        batch = build_tree_batch([TREE], kv.lengths, 4, profile, model.dtype, "cpu")
        forward_tree_batch(model, profile, kv, batch)
        kv.commit(4, [[0, 1, 2, 3]])
    assert_rows_hold(model, kv, [PREFIXES[0] + [20, 30, 31, 32]])


@pytest.mark.parametrize("seed", range(20))
def test_commit_moves_what_a_row_by_row_reference_moves(seed) -> None:
    """Random rows, trees and accepted paths (overlapping moves included) against a reference
    that rebuilds each row as its first ``lengths[i]`` entries followed by its kept entries."""
    from transformers import DynamicCache

    rng = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 6, (), generator=rng))
    lengths = [int(n) for n in torch.randint(0, 9, (rows,), generator=rng)]
    width = max(lengths) if any(lengths) else 0
    tree = int(torch.randint(1, 7, (), generator=rng))
    kept = []
    for _ in range(rows):
        depth = int(torch.randint(0, tree + 1, (), generator=rng))
        path = sorted(torch.randperm(tree - 1, generator=rng)[: max(depth - 1, 0)].add(1).tolist())
        kept.append([0, *path] if depth else [])
    cache = DynamicCache()
    for layer in range(2):
        keys = torch.randn(rows, 2, width + tree, 3, generator=rng)
        cache.update(keys, keys + 100, layer)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    kv = BatchedCache()
    kv.cache, kv.lengths = cache, list(lengths)
    kv.commit(width, kept)
    assert kv.lengths == [n + len(k) for n, k in zip(lengths, kept)]
    for (keys, values), layer in zip(before, kv.cache.layers):
        for row, (n, k) in enumerate(zip(lengths, kept)):
            want = torch.cat([keys[row, :, :n], keys[row, :, [width + i for i in k]]], dim=1)
            torch.testing.assert_close(layer.keys[row, :, : n + len(k)], want, rtol=0, atol=0)
            want = torch.cat([values[row, :, :n], values[row, :, [width + i for i in k]]], dim=1)
            torch.testing.assert_close(layer.values[row, :, : n + len(k)], want, rtol=0, atol=0)


def test_cache_layers_grow_in_place_and_keep_their_entries() -> None:
    """new_cache's layers write each update after the last entry (no copy of the cache while the
    buffer has room), crop as views, and take tensors set from outside into a new buffer."""
    from decoder.kv_cache import SpareCapacityLayer, new_cache

    cache = new_cache()
    entries = torch.randn(2, 3, 10, 4)
    cache.update(entries[:, :, :6], entries[:, :, :6] + 1, 0)
    layer = cache.layers[0]
    assert isinstance(layer, SpareCapacityLayer)  # transformers still makes layers from the class
    start = layer.keys.data_ptr()
    cache.update(entries[:, :, 6:8], entries[:, :, 6:8] + 1, 0)
    assert layer.keys.data_ptr() == start  # written in place
    cache.crop(7)
    cache.update(entries[:, :, 8:10], entries[:, :, 8:10] + 1, 0)
    want = torch.cat([entries[:, :, :7], entries[:, :, 8:10]], dim=2)
    torch.testing.assert_close(layer.keys, want, rtol=0, atol=0)
    torch.testing.assert_close(layer.values, want + 1, rtol=0, atol=0)
    layer.keys, layer.values = layer.keys[[1, 0]], layer.values[[1, 0]]  # rows swapped outside
    cache.update(entries[:, :, :1], entries[:, :, :1], 0)
    torch.testing.assert_close(layer.keys[:, :, :9], want[[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(layer.keys[:, :, 9:], entries[:, :, :1], rtol=0, atol=0)
    big = torch.randn(2, 3, 500, 4)  # past the buffer's room: a larger one, entries kept
    cache.update(big, big, 0)
    torch.testing.assert_close(layer.keys[:, :, 10:], big, rtol=0, atol=0)
    torch.testing.assert_close(layer.keys[:, :, :9], want[[1, 0]], rtol=0, atol=0)
