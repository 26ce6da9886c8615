"""How a ``RestGenerator`` drafts and verifies: frozen dataclasses, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rest.types import SearchParams

AUTO = "auto"
DRAFTING_ENGINES = ("native", "python")
REPRODUCIBLE_BUDGET = 16  # an "auto" budget under DecodingConfig(reproducible=True)


@dataclass(frozen=True)
class NgramParams:
    """How an n-gram source (the context, the served outputs) drafts.

    For every n from ``max_ngram`` down to ``min_ngram`` such that the context's last n tokens
    occurred before in the source, one level: the next ``max_length`` tokens after each of their
    ``max_occurrences`` latest occurrences, believed with ``trust`` (see
    ``decoder.draft_tree.Level``: how many occurrences make the level half-believed).
    """

    min_ngram: int = 1
    max_ngram: int = 4
    max_length: int = 10
    max_occurrences: int = 32
    trust: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}..{self.max_ngram}"
            )
        if self.max_length < 1 or self.max_occurrences < 1:
            raise ValueError("max_length and max_occurrences must be >= 1")
        if self.trust < 0:
            raise ValueError(f"trust must be >= 0, got {self.trust}")


@dataclass(frozen=True)
class DecodingConfig:
    """Settings of a generator (per-call settings such as temperature go to ``generate``).

    ``budget``: draft nodes verified per step, or ``"auto"`` to choose, every step, the tree size
    that maximises expected tokens per second (see ``decoder.budget``). ``max_budget`` bounds the
    automatic choice.

    Draft sources, each giving levels of counted continuations that one scorer turns into the
    step's draft tree (``DraftTree.from_levels``):

    - the datastore, through the retriever: ``retrieval_levels`` searches with ``search`` (its
      ``budget`` is the candidates per search), the first for the longest matching suffix, each
      next one for the longest suffix shorter than the last match. A remote retriever pays one
      round trip per level: 1 level saves two round trips for a little acceptance (M 2.33
      instead of 2.40 on the replay benchmark). Asking for 128 candidates instead of 64 gains
      nothing measurable there (M +0.0006) for about 40% more drafting time. Each level is
      believed with ``retrieval_trust`` (32 occurrences make a match of up to 4 tokens
      half-believed; a longer match needs proportionally fewer, ``draft_sources.match_trust``).
    - ``context_drafts``: the sequence's own prompt and output (``context``), believed with trust
      2 (2 occurrences make a level half-believed).
    - ``served_drafts``: the outputs of the generator's earlier calls (``served``), at most
      ``served_max_tokens`` tokens of them (about 0.4 KB of memory each), the oldest forgotten
      first. Its levels take the 64 latest occurrences, not the context's 32: short n-grams recur
      across outputs far more than within one, and the wider count is better at every budget on
      the replay benchmark (M 2.401 instead of 2.399 at 64 nodes, 2.253 instead of 2.247 at 32,
      equal at 4).

    The trusts (context 2, served outputs 3, datastore 32; before: 1, 3, 16) were chosen on the
    first half of the replay benchmark's problems and checked on the other half, where they raise
    M at 4 nodes from 1.718 to 1.731; on all problems M rises at every budget from 2 to 32 (1.746
    to 1.765 at 4) and stays 2.401 at 64. Trusting the datastore less lets the sequence's own and
    the served continuations rank above the datastore's wide, shallow trees in small budgets.

    ``score_correction``: scale the scores, before choosing an automatic budget, by how many
    draft tokens recent steps accepted against how many their scores predicted (an exponential
    moving sum forgetting ``score_correction_decay`` per step): over-confident drafts then cost
    fewer wasted verifications. ``cost_correction``: add to the calibrated verification cost what
    recent steps of the same batch size cost beyond it (``decoder.budget.CostCorrection``).
    ``drafting_gate``: skip the drafting phase for a while at a batch size where a step's drafts,
    with the drafting time counted, were expected to be slower than a plain step
    (``decoder.budget.DraftingGate``).

    ``retrieval_deadline_s``: a retrieval slower than this (all of a step's levels together)
    gives no datastore drafts for that step (the output does not change); ``None`` waits.

    ``allow_tokenizer_mismatch``: use a datastore built with another tokenizer anyway (the output
    stays correct, only the drafts are useless).

    ``require_retriever``: fail when the retriever cannot be reached, instead of decoding with
    plain steps (one warning) and using it once it answers.

    ``drafting``: ``"native"`` drafts each step in one engine call (the context and served-output
    indexes kept in the engine, an in-process datastore searched there, every level scored
    there); ``"python"`` runs the reference implementation of the same rules in Python (the same
    trees, several times slower).
    ``reproducible``: the same call gives the same trees, hence the same output, every time, in
    any dtype. In float32 the output is the model's own whatever the trees; in bfloat16 and
    float16 a tree step rounds differently from a plain step, so the trees can change the output
    (rarely), and by default they change from call to call: earlier outputs feed the served
    drafts, the adaptive budget follows measured timings, a late retrieval gives no drafts. With
    ``reproducible``, trees depend only on the prompt and the datastore's answers: no served
    drafts, an ``"auto"`` budget becomes ``REPRODUCIBLE_BUDGET`` nodes, and retrievals are awaited
    (a remote retriever's own deadline still bounds them; one that fails still changes the
    trees). A batch shares its forward passes, so the same holds for a sequence decoded alone.
    """

    budget: int | str = AUTO
    max_budget: int = 64
    search: SearchParams = field(default_factory=lambda: SearchParams(min_span=1))
    retrieval_levels: int = 3
    retrieval_trust: float = 32.0
    context_drafts: bool = True
    context: NgramParams = field(default_factory=lambda: NgramParams(trust=2.0))
    served_drafts: bool = True
    served: NgramParams = field(default_factory=lambda: NgramParams(max_occurrences=64, trust=3.0))
    served_max_tokens: int = 1 << 16
    score_correction: bool = True
    score_correction_decay: float = 0.9
    cost_correction: bool = True
    drafting_gate: bool = True
    retrieval_deadline_s: float | None = 0.1
    allow_tokenizer_mismatch: bool = False
    require_retriever: bool = False
    drafting: str = "native"
    reproducible: bool = False
    calibration_prefix: int = 32
    calibration_repeats: int = 3

    def __post_init__(self) -> None:
        if self.budget != AUTO and not (isinstance(self.budget, int) and self.budget >= 0):
            raise ValueError(f"budget must be a non-negative int or 'auto', got {self.budget!r}")
        if self.max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {self.max_budget}")
        if self.retrieval_levels < 1:
            raise ValueError(f"retrieval_levels must be >= 1, got {self.retrieval_levels}")
        if self.retrieval_trust < 0:
            raise ValueError(f"retrieval_trust must be >= 0, got {self.retrieval_trust}")
        if self.served_max_tokens < 1:
            raise ValueError(f"served_max_tokens must be >= 1, got {self.served_max_tokens}")
        if not 0 <= self.score_correction_decay < 1:
            raise ValueError(
                f"score_correction_decay must be in [0, 1), got {self.score_correction_decay}"
            )
        if self.retrieval_deadline_s is not None and self.retrieval_deadline_s <= 0:
            raise ValueError(
                f"retrieval_deadline_s must be > 0 or None, got {self.retrieval_deadline_s}"
            )
        if self.drafting not in DRAFTING_ENGINES:
            raise ValueError(f"drafting must be one of {DRAFTING_ENGINES}, got {self.drafting!r}")
        if self.calibration_prefix < 1 or self.calibration_repeats < 1:
            raise ValueError("calibration_prefix and calibration_repeats must be >= 1")

    def resolved(self) -> DecodingConfig:
        """The settings actually used: ``reproducible`` applied."""
        if not self.reproducible:
            return self
        budget = REPRODUCIBLE_BUDGET if self.adaptive else self.budget
        return replace(self, budget=budget, served_drafts=False, retrieval_deadline_s=None)

    @property
    def adaptive(self) -> bool:
        return self.budget == AUTO

    @property
    def tree_budget(self) -> int:
        """The most draft nodes one step may verify."""
        return self.max_budget if self.adaptive else int(self.budget)
