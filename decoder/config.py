"""How a ``RestGenerator`` drafts and verifies: one frozen dataclass, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

from rest.types import SearchParams

AUTO = "auto"
MERGE_RULES = ("union", "max")


@dataclass(frozen=True)
class DecodingConfig:
    """Settings of a generator (per-call settings such as temperature go to ``generate``).

    ``budget``: draft nodes verified per step, or ``"auto"`` to choose, every step, the tree size
    that maximises expected tokens per second (see ``decoder.budget``). ``max_budget`` bounds the
    automatic choice and is the tree size asked from the retriever.

    ``search``: how the retriever is queried; its ``budget`` is replaced by the budget above.

    ``context_drafts``: also draft from the sequence's own prompt and output (prompt lookup): the
    continuations of earlier occurrences of the longest suffix of ``context_min_ngram`` ..
    ``context_max_ngram`` tokens, at most ``context_max_length`` tokens each, from the
    ``context_max_occurrences`` latest occurrences.

    ``merge``: how the scores of one path proposed by several sources combine: ``"union"``
    (1 - (1 - p1)(1 - p2), as if the sources erred independently) or ``"max"``.

    ``retrieval_deadline_s``: a retrieval slower than this gives no draft for that step (the
    step runs at plain speed, the output does not change); ``None`` waits for it.

    ``allow_tokenizer_mismatch``: use a datastore built with another tokenizer anyway (the output
    stays correct, only the drafts are useless).
    """

    budget: int | str = AUTO
    max_budget: int = 64
    search: SearchParams = field(default_factory=SearchParams)
    context_drafts: bool = True
    context_min_ngram: int = 1
    context_max_ngram: int = 4
    context_max_length: int = 10
    context_max_occurrences: int = 64
    merge: str = "union"
    retrieval_deadline_s: float | None = 0.1
    allow_tokenizer_mismatch: bool = False
    calibration_prefix: int = 32
    calibration_repeats: int = 3

    def __post_init__(self) -> None:
        if self.budget != AUTO and not (isinstance(self.budget, int) and self.budget >= 0):
            raise ValueError(f"budget must be a non-negative int or 'auto', got {self.budget!r}")
        if self.max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {self.max_budget}")
        if not 1 <= self.context_min_ngram <= self.context_max_ngram:
            raise ValueError(
                "need 1 <= context_min_ngram <= context_max_ngram, got "
                f"{self.context_min_ngram}..{self.context_max_ngram}"
            )
        if self.context_max_length < 1 or self.context_max_occurrences < 1:
            raise ValueError("context_max_length and context_max_occurrences must be >= 1")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"merge must be one of {MERGE_RULES}, got {self.merge!r}")
        if self.retrieval_deadline_s is not None and self.retrieval_deadline_s <= 0:
            raise ValueError(
                f"retrieval_deadline_s must be > 0 or None, got {self.retrieval_deadline_s}"
            )
        if self.calibration_prefix < 1 or self.calibration_repeats < 1:
            raise ValueError("calibration_prefix and calibration_repeats must be >= 1")

    @property
    def adaptive(self) -> bool:
        return self.budget == AUTO

    @property
    def tree_budget(self) -> int:
        """The most draft nodes one step may verify."""
        return self.max_budget if self.adaptive else int(self.budget)
