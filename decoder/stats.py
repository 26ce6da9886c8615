"""What one generation did, for ``RestGenerator`` and ``BatchDecoder`` alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GenerationStats:
    """What one generation did. Times are wall-clock seconds; ``retrieval_s`` covers its drafting
    (every source and the scoring), ``verification_s`` the forward passes over its trees with their
    acceptance (shared with the other sequences of a batch). ``steps`` counts forward passes that
    emitted tokens, the prefill included (plain decoding: one per token)."""

    prompt_tokens: int
    new_tokens: int
    steps: int
    draft_tokens: int
    retrieval_failures: int
    prefill_s: float
    retrieval_s: float
    verification_s: float
    total_s: float

    @property
    def accepted_draft_tokens(self) -> int:
        """Tokens gained over plain decoding (which emits one per step)."""
        return self.new_tokens - self.steps

    @property
    def mean_accepted(self) -> float:
        """M: new tokens per step (1 for plain decoding)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int]:
        derived = ("accepted_draft_tokens", "mean_accepted", "tokens_per_s")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}
