"""The model side of a step: prefill, one forward pass over every row's draft tree, the tree walk.

Prefill is ``generate``'s own first forward pass: the whole prompt, a 2D attention mask of ones,
positions ``0..n-1``, the logits of the last position only. Its logits choose the first new
token, as in ``generate``; the KV cache then holds the prompt, and that token is the first root.

A tree step feeds, for every row of the batch, the root and its draft nodes (``TreeBatch``), with
per-row positions (cache length + depth) and one additive 4D mask per attention pattern: a node
sees the cached entries of its own row that its layer's pattern allows, measured from the node's
own position (a sliding window: the last ``window`` positions; a chunk: its own block), plus its
ancestors and itself; siblings, padding and stale entries stay invisible. A batch of one row with
no draft nodes takes ``generate``'s own path instead (a 2D mask of ones; the model builds its
masks), so plain steps compute exactly what ``generate`` computes, in any dtype.

The walk is the acceptance rule for greedy decoding and for sampling alike. Starting at the root,
ask the model for its token at the current node (``choose``: argmax, or one draw from the
processed distribution); if a child of the node carries that token, descend and repeat; otherwise
emit the token as the bonus token and stop. Every emitted token is thus the model's own choice
given everything before it, which is why the output equals plain decoding (greedy) or is
distributed exactly as plain sampling: a draft only decides how many of those choices one forward
pass can make.

Drawing one token per (path, position) independently and keeping the longest match, as the
original REST code does, is biased: a first-level draft token shared by m paths gets m chances,
and is accepted with probability 1 - (1 - p)^m instead of p.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from decoder.kv_cache import BatchedCache, new_cache
from decoder.model_support import ModelProfile, tree_attention


def prefill(model: torch.nn.Module, ids: Sequence[int]) -> tuple[DynamicCache, torch.Tensor]:
    """``generate``'s first forward pass over ``ids``: (a cache holding them, the logits after
    the last one, [vocab] in the model's dtype)."""
    cache = new_cache()
    n = len(ids)
    device = model.device
    extra = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the prompt's logits are unused: [prompt, vocab] can be huge
    out = model(
        input_ids=torch.tensor([list(ids)], device=device),  # [1, n]
        attention_mask=torch.ones((1, n), dtype=torch.long, device=device),  # [1, n]
        position_ids=torch.arange(n, device=device)[None],  # [1, n]
        cache_position=torch.arange(n, device=device),  # [n]
        past_key_values=cache,
        use_cache=True,
        **extra,
    )
    return cache, out.logits[0, -1]  # [vocab]


def forward_as_generate(
    model: torch.nn.Module, inputs: dict, length: int
) -> tuple[DynamicCache, torch.Tensor]:
    """A forward pass with the inputs the model's own ``prepare_inputs_for_generation`` made
    (no cache: the model makes its own): (a cache of ``length`` entries in the decoder's layout,
    the logits after the last token, [vocab])."""
    out = model(**inputs, return_dict=True)
    cache = new_cache()
    for layer_idx, layer in enumerate(out.past_key_values.layers):
        keys, values = layer.keys, layer.values  # [1, kv_heads, kept, head_dim]
        missing = length - keys.shape[-2]  # a sliding layer kept only its window: the rest is
        if missing > 0:  # never visible again, zeros stand in for it
            keys = torch.cat([keys.new_zeros((*keys.shape[:2], missing, keys.shape[-1])), keys], 2)
            values = torch.cat(
                [values.new_zeros((*values.shape[:2], missing, values.shape[-1])), values], 2
            )
        cache.update(keys, values, layer_idx)
    return cache, out.logits[0, -1]


@dataclass(frozen=True)
class RowTree:
    """One row's tree for a step: the root token and the draft nodes (parents before children,
    -1 for a child of the root)."""

    root: int
    tokens: Sequence[int]
    parents: Sequence[int]

    def __len__(self) -> int:
        return len(self.tokens) + 1


@dataclass(frozen=True)
class TreeBatch:
    """Every row's root and draft nodes laid out for one forward pass. Tree index 0 is a row's
    root, tree index ``i + 1`` its draft node ``i``; rows are padded to ``width`` tree indices."""

    input_ids: torch.Tensor  # [rows, width]
    position_ids: torch.Tensor  # [rows, width]: cache length + depth
    cache_position: torch.Tensor  # [width]: where the new entries land in the cache
    masks: dict[str | None, torch.Tensor]  # pattern key -> [rows, 1, width, cache + width]
    children: tuple[tuple[dict[int, int], ...], ...]  # per row: tree index -> {token: child}
    depths: tuple[np.ndarray, ...]  # per row: depth of each tree index (root 0)

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


def tree_structure(parents: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(visible [n, n] ancestor-or-self matrix over tree indices, depth [n]) of a tree whose
    draft node ``i`` has parent ``parents[i]`` (-1: the root)."""
    n = len(parents) + 1
    tree_parents = np.array([-1] + [p + 1 for p in parents], dtype=np.int64)
    visible = np.eye(n, dtype=bool)  # visible[i, j]: tree index i attends to tree index j
    for node in range(1, n):
        visible[node] |= visible[tree_parents[node]]
    return visible, visible.sum(axis=1) - 1


def build_tree_batch(
    rows: Sequence[RowTree],
    lengths: Sequence[int],
    cache_width: int,
    profile: ModelProfile,
    dtype: torch.dtype,
    device: torch.device | str,
) -> TreeBatch:
    """The inputs of one step: row ``i`` has ``lengths[i]`` cached entries (positions
    ``0..lengths[i]-1``) in a cache ``cache_width`` wide, and the tree ``rows[i]``."""
    n_rows, width = len(rows), max(len(row) for row in rows)
    input_ids = np.zeros((n_rows, width), dtype=np.int64)
    positions = np.zeros((n_rows, width), dtype=np.int64)
    tree_visible = np.zeros((n_rows, width, width), dtype=bool)
    children, depths = [], []
    for i, (row, length) in enumerate(zip(rows, lengths)):
        n = len(row)
        visible, depth = tree_structure(row.parents)
        input_ids[i, :n] = [row.root, *row.tokens]
        input_ids[i, n:] = row.root  # padding: any valid token
        positions[i, :n] = length + depth
        positions[i, n:] = length
        tree_visible[i, :n, :n] = visible
        tree_visible[i, np.arange(n, width), np.arange(n, width)] = True  # padding sees itself
        kids: list[dict[int, int]] = [{} for _ in range(n)]
        for node, (token, parent) in enumerate(zip(row.tokens, row.parents)):
            kids[parent + 1][int(token)] = node + 1
        children.append(tuple(kids))
        depths.append(depth)

    position_ids = torch.from_numpy(positions).to(device)  # [rows, width]
    lengths_t = torch.tensor(list(lengths), device=device)  # [rows]
    # Key positions: cached entries at their index while valid, tree entries at their node's.
    cached = torch.arange(cache_width, device=device)  # [cache]
    valid = cached[None, :] < lengths_t[:, None]  # [rows, cache]
    key_positions = torch.cat([cached.expand(n_rows, -1), position_ids], dim=1)  # [rows, keys]
    base = torch.cat([valid[:, None, :].expand(-1, width, -1),
                      torch.from_numpy(tree_visible).to(device)], dim=2)  # fmt: skip
    # base: [rows, width, cache + width], True where a query may attend before any pattern
    query = position_ids[:, :, None]  # [rows, width, 1]
    keys = key_positions[:, None, :]  # [rows, 1, keys]
    masks = {}
    for key, pattern in profile.masks.items():
        visible = base
        if pattern.window is not None:
            visible = visible & (keys > query - pattern.window)
        if pattern.chunk is not None:
            visible = visible & (keys // pattern.chunk == query // pattern.chunk)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        masks[key] = mask[:, None]  # [rows, 1, width, cache + width]
    return TreeBatch(
        input_ids=torch.from_numpy(input_ids).to(device),
        position_ids=position_ids,
        cache_position=torch.arange(cache_width, cache_width + width, device=device),
        masks=masks,
        children=tuple(children),
        depths=tuple(depths),
    )


def forward_tree_batch(
    model: torch.nn.Module, profile: ModelProfile, kv: BatchedCache, batch: TreeBatch
) -> torch.Tensor:
    """One forward pass over ``batch``; its entries are appended to ``kv`` (``commit`` keeps the
    accepted ones). Returns logits [rows, width, vocab] in the model's dtype."""
    if profile.hooked_layers:
        attention_mask = next(iter(batch.masks.values()))  # the hooks give each layer its own
    elif None in batch.masks:
        attention_mask = batch.masks[None]
    else:
        attention_mask = batch.masks  # one mask per layer type, as these models accept
    with tree_attention(profile, batch.masks):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=attention_mask,
            position_ids=batch.position_ids,
            cache_position=batch.cache_position,
            past_key_values=kv.cache,
            use_cache=True,
        )
    return out.logits


def forward_plain(model: torch.nn.Module, kv: BatchedCache, root: int) -> torch.Tensor:
    """A batch of one row without draft nodes, the way ``generate`` runs a decoding step.
    Returns logits [1, 1, vocab]."""
    length = kv.lengths[0]
    device = model.device
    out = model(
        input_ids=torch.tensor([[root]], device=device),  # [1, 1]
        attention_mask=torch.ones((1, length + 1), dtype=torch.long, device=device),
        position_ids=torch.tensor([[length]], device=device),  # [1, 1]
        cache_position=torch.tensor([length], device=device),  # [1]
        past_key_values=kv.cache,
        use_cache=True,
    )
    return out.logits


def walk_tree(
    children: Sequence[dict[int, int]], choose: Callable[[int], int]
) -> tuple[list[int], list[int]]:
    """(accepted, emitted): the tree indices of the root and the accepted path, and the tokens
    emitted: the accepted path's tokens, then the bonus token."""
    node = 0
    accepted = [0]
    emitted: list[int] = []
    while True:
        token = choose(node)
        emitted.append(token)
        child = children[node].get(token)
        if child is None:
            return accepted, emitted
        accepted.append(child)
        node = child

