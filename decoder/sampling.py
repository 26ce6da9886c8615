"""Choosing the model's token at a tree node: argmax, or one draw from the processed distribution.

The scores at a node are what ``generate`` computes at that point of plain decoding: the logits in
float32, passed through the sequence's logits processors (``decoder.settings``) with the node's own
token history, the context up to the root plus the path to the node. Greedy decoding takes their
argmax; sampling draws from their softmax by inverting the CDF with exactly one uniform number per
emitted token, taken from the sequence's ``torch.Generator``. The tree walk
(``decoder.verify.walk_tree``) asks for one token per node it visits and emits each one, so a seed
gives the same tokens whether the steps verify large trees or none at all (up to float rounding of
the logits). The draws follow the same distribution as ``generate``'s ``torch.multinomial``, not
the same random stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.generation.logits_process import LogitsProcessorList


def processed_scores(
    processors: LogitsProcessorList, history: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """``generate``'s scores: history [k, t] token ids, logits [k, vocab] -> [k, vocab] float32."""
    scores = logits.to(torch.float32, copy=True)  # processors may write in place
    return processors(history, scores) if len(processors) else scores


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [vocab] using one uniform from ``generator`` (inverse CDF).

    Tokens of probability zero are never drawn: the first CDF entry above ``u * total`` always
    belongs to a token with positive mass.
    """
    cdf = probs.double().cumsum(0)  # [vocab]
    u = torch.rand(1, generator=generator, dtype=torch.float64).to(cdf.device)  # [1]
    index = torch.searchsorted(cdf, u * cdf[-1], right=True)  # [1]
    return int(index.clamp_(max=cdf.numel() - 1).item())


def node_paths(tokens: Sequence[int], parents: Sequence[int]) -> list[list[int]]:
    """The path of tokens from the root (excluded) to each tree index (the root's is empty)."""
    paths: list[list[int]] = [[]]
    for token, parent in zip(tokens, parents):
        paths.append(paths[parent + 1] + [int(token)])
    return paths


def node_chooser(
    logits: torch.Tensor,
    context: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    processors: LogitsProcessorList,
    greedy: bool,
    generator: torch.Generator | None,
) -> Callable[[int], int]:
    """``choose(node)``: the model's token at tree index ``node`` of one sequence's tree.

    ``logits``: [n_tree, vocab] (any float dtype); ``context``: [t] the token ids up to and
    including the root, on the logits' device; ``tokens``/``parents``: the draft nodes.
    """
    n_tree = len(tokens) + 1
    if greedy and not len(processors):
        choices = logits[:n_tree].argmax(dim=-1).tolist()  # one device sync for the whole tree
        return choices.__getitem__
    paths = node_paths(tokens, parents)

    def history(nodes: Sequence[int]) -> torch.Tensor:  # [len(nodes), t + depth]
        path = torch.tensor([paths[n] for n in nodes], dtype=context.dtype, device=context.device)
        return torch.cat([context.expand(len(nodes), -1), path.view(len(nodes), -1)], dim=1)

    if greedy:
        # All nodes at once, one group per depth (the histories of a group have one length).
        choices = [0] * n_tree
        by_depth: dict[int, list[int]] = {}
        for node, path in enumerate(paths):
            by_depth.setdefault(len(path), []).append(node)
        for nodes in by_depth.values():
            scores = processed_scores(processors, history(nodes), logits[nodes])
            for node, token in zip(nodes, scores.argmax(dim=-1).tolist()):
                choices[node] = token
        return choices.__getitem__
    if generator is None:
        raise ValueError("sampling needs a torch.Generator")

    def choose(node: int) -> int:
        # Only visited nodes are processed: the cost follows emitted tokens, not the tree size.
        scores = processed_scores(processors, history([node]), logits[node : node + 1])
        return draw(torch.softmax(scores[0], dim=-1), generator)

    return choose
