"""The KV cache of a batch of sequences, one row each, between steps.

Row ``i`` holds its sequence's context minus the root at cache indices ``[0, lengths[i])``,
where cache index and position coincide. The cache is ``width`` entries wide, the longest row's
length; a shorter row has stale entries in ``[lengths[i], width)`` that the tree masks hide. A
step appends every row's draft tree (padded to the widest tree) at ``[width, width + n)``;
``commit`` then moves each row's root and accepted path to its own end, as if they had been fed
one by one, and drops the rest.

The cache is a ``DynamicCache`` built without the model's config on purpose: a config with a
sliding window would give layers that drop old keys on their own, and the tree positions must stay
addressable; windows are applied by the masks instead, by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class SpareCapacityLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with room to grow.

    ``DynamicLayer.update`` concatenates, copying every row's whole cache at every step; here
    the new entries are written after the old ones and only a full buffer is copied (into one a
    quarter larger), so a step costs what it adds. ``crop`` keeps working as a view. Whoever sets
    ``keys``/``values`` to tensors of their own (``BatchedCache`` when rows join or leave) is
    noticed at the next update, which buffers them again."""

    def lazy_initialization(self, key_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states)
        self._key_buffer = self._value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs=None):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        n = self.get_seq_length()
        end = n + key_states.shape[-2]
        if not (_is_prefix_view(self.keys, self._key_buffer, end)
                and _is_prefix_view(self.values, self._value_buffer, end)):  # fmt: skip
            capacity = end + max(end // 4, 64)
            self._key_buffer = _buffer(self.keys, n, key_states, capacity)
            self._value_buffer = _buffer(self.values, n, value_states, capacity)
        self._key_buffer[..., n:end, :] = key_states
        self._value_buffer[..., n:end, :] = value_states
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values


def _is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor | None, end: int) -> bool:
    """Whether ``tensor`` is ``buffer[..., :k, :]`` for some k, and ``buffer`` holds ``end``."""
    return (
        buffer is not None
        and end <= buffer.shape[-2]
        and tensor.data_ptr() == buffer.data_ptr()
        and tensor.stride() == buffer.stride()
        and tensor.shape[:2] == buffer.shape[:2]
        and tensor.shape[-1] == buffer.shape[-1]
    )


def _buffer(old: torch.Tensor, n: int, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """An empty buffer shaped like ``new`` with ``capacity`` entries, ``old``'s ``n`` first."""
    buffer = new.new_empty((*new.shape[:-2], capacity, new.shape[-1]))
    if n:
        buffer[..., :n, :] = old
    return buffer


def new_cache() -> DynamicCache:
    """An empty cache whose layers (full attention, made on the first update) grow in place.
    A transformers without ``layer_class_to_replicate`` gets plain ``DynamicLayer``s: the same
    entries, concatenated."""
    cache = DynamicCache()
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = SpareCapacityLayer
    return cache


class BatchedCache:
    """The rows of a batch in one ``DynamicCache`` (batch dimension = rows, in order)."""

    def __init__(self) -> None:
        self.cache = new_cache()
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.lengths else 0

    def _layers(self) -> list:
        return list(self.cache.layers) if self.lengths else []

    def append(self, single: DynamicCache, length: int) -> int:
        """Add a one-row cache holding ``length`` entries as the last row; return its row number."""
        assert single.get_seq_length() == length
        if not self.lengths:
            self.cache = single
            self.lengths = [length]
            return 0
        width = max(self.width, length)
        for layer, new in zip(self.cache.layers, single.layers):
            # keys, values: [rows, kv_heads, width, head_dim]
            layer.keys = torch.cat([_pad(layer.keys, width), _pad(new.keys, width)], dim=0)
            layer.values = torch.cat([_pad(layer.values, width), _pad(new.values, width)], dim=0)
        self.lengths.append(length)
        return len(self.lengths) - 1

    def replace(self, row: int, single: DynamicCache, length: int) -> None:
        """Put a one-row cache in place of row ``row`` (a sequence whose cache was rebuilt)."""
        assert single.get_seq_length() == length
        if len(self.lengths) == 1:
            self.cache, self.lengths = single, [length]
            return
        width = max(self.width, length)
        for layer, new in zip(self.cache.layers, single.layers):
            keys, values = _pad(layer.keys, width), _pad(layer.values, width)
            keys[row : row + 1], values[row : row + 1] = _pad(new.keys, width), _pad(new.values, width)
            layer.keys, layer.values = keys, values
        self.lengths[row] = length
        self._shrink()

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); the others leave the batch."""
        rows = list(rows)
        if rows == list(range(len(self.lengths))):
            return
        self.lengths = [self.lengths[r] for r in rows]
        if not rows:
            self.cache = new_cache()
            return
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self._shrink()

    def commit(self, width_before: int, kept: Sequence[Sequence[int]]) -> None:
        """After a step that appended its trees at ``[width_before, ...)``: row ``i`` keeps the
        tree indices ``kept[i]`` (root = 0 first, then the accepted path in order) after its
        ``lengths[i]`` entries; everything else is dropped."""
        assert len(kept) == len(self.lengths)
        new_lengths = [n + len(k) for n, k in zip(self.lengths, kept)]
        # (row, to, from) of each kept entry that is not already where it belongs; nothing else
        # moves (a row's stale entries beyond its length stay hidden by the masks). Moving only
        # these, rather than every row's whole span from the shortest row's end, keeps the cost
        # of a step with rows of different lengths to its accepted tokens.
        moves = [
            (row, n + j, width_before + index)
            for row, (n, k) in enumerate(zip(self.lengths, kept))
            for j, index in enumerate(k)
            if n + j != width_before + index
        ]
        if moves:
            device = self.cache.layers[0].keys.device
            rows, to, source = (torch.tensor(c, dtype=torch.long, device=device) for c in zip(*moves))
            for layer in self.cache.layers:
                # the right-hand side is a copy taken before any write: moves may overlap
                layer.keys[rows, :, to] = layer.keys[rows, :, source]
                layer.values[rows, :, to] = layer.values[rows, :, source]
        self.lengths = new_lengths
        self.cache.crop(max(new_lengths))

    def _shrink(self) -> None:
        if self.lengths and self.cache.get_seq_length() > max(self.lengths):
            self.cache.crop(max(self.lengths))


def _pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` [rows, heads, n, dim] right-padded with zeros to ``width`` entries."""
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros((*tensor.shape[:-2], missing, tensor.shape[-1]))
    return torch.cat([tensor, pad], dim=-2)
