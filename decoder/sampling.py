"""Choosing the model's token at a tree node: argmax, or one draw from the processed distribution.

Sampling draws by inverting the CDF with exactly one uniform number per emitted token, taken from
the caller's ``torch.Generator``. The tree walk (``decoder.verify.walk_tree``) asks for one token
per node it visits and emits each one, so a seed gives the same tokens whether the steps verify
large trees or none at all (up to float rounding of the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0``: greedy. Otherwise logits are processed as Hugging Face's warpers do
    (temperature, then top-k, then top-p) and one token is drawn. ``top_k == 0`` and
    ``top_p == 1`` disable their filter."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target distribution of sampling: logits [n, vocab] -> probabilities [n, vocab]."""
    scores = logits.float()
    # The same warpers, in the same order, as transformers' generate; they ignore input_ids.
    scores = TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k > 0:
        scores = TopKLogitsWarper(top_k=params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=params.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [vocab] using one uniform from ``generator`` (inverse CDF).

    Tokens of probability zero are never drawn: the first CDF entry above ``u * total`` always
    belongs to a token with positive mass.
    """
    cdf = probs.double().cumsum(0)  # [vocab]
    u = torch.rand(1, generator=generator, dtype=torch.float64).to(cdf.device)  # [1]
    index = torch.searchsorted(cdf, u * cdf[-1], right=True)  # [1]
    return int(index.clamp_(max=cdf.numel() - 1).item())


def node_chooser(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Callable[[int], int]:
    """``choose(node)``: the model's token at tree index ``node``, from logits [n_tree, vocab]."""
    if params.greedy:
        choices = logits.argmax(dim=-1).tolist()  # one device sync for the whole tree
        return choices.__getitem__
    if generator is None:
        raise ValueError("sampling needs a torch.Generator")

    def choose(node: int) -> int:
        # Only visited nodes are processed: the cost follows emitted tokens, not the tree size.
        return draw(processed_probs(logits[node : node + 1], params)[0], generator)

    return choose
