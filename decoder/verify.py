"""The model side of a step: prefill, one forward pass over a draft tree, and the tree walk.

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

import torch

from decoder.draft_tree import TreeInputs


def prefill(model: torch.nn.Module, cache, ids: Sequence[int]) -> None:
    """Feed ``ids`` (the context minus the root) into an empty cache."""
    if not ids:
        return
    input_ids = torch.tensor([list(ids)], device=model.device)  # [1, prefix]
    extra = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # the prefix's logits are unused: [prefix, vocab] can be huge
    model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra)


def verify_tree(model: torch.nn.Module, cache, tree: TreeInputs) -> torch.Tensor:
    """Logits at every tree node, [n_tree, vocab] in float32; the tree's keys and values are
    appended to the cache (``keep_accepted`` trims them)."""
    out = model(
        input_ids=tree.input_ids,
        attention_mask=tree.attention_mask,
        position_ids=tree.position_ids,
        cache_position=tree.cache_position,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[0].float()  # [n_tree, vocab]


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
