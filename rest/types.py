"""The value types shared by the engine, the gRPC service and the decoder."""

from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("exact", "rest")


@dataclass(frozen=True)
class SearchParams:
    """How a context is searched.

    ``policy="exact"``: the longest suffix of ``min_span..max_span`` tokens, then the continuation
    tree grown best-first by exact occurrence count (ties: shallower first, then the earlier-added
    parent, then the smaller token id), at most ``budget`` nodes and ``max_depth`` deep.

    ``policy="rest"``: the original REST policy (suffix lengths ``max_span`` down to ``min_span``,
    the first 5,000 occurrences in suffix-array order, ``max_depth``-token continuations, the
    ``budget`` most frequent prefixes, then its distinct-token cut).
    """

    min_span: int = 2
    max_span: int = 16
    budget: int = 64
    max_depth: int = 10
    policy: str = "exact"

    def __post_init__(self) -> None:
        if self.min_span < 1:
            raise ValueError(f"min_span must be >= 1, got {self.min_span}")
        if self.max_span < self.min_span:
            raise ValueError(f"max_span ({self.max_span}) must be >= min_span ({self.min_span})")
        if self.max_span > 256:
            raise ValueError(f"max_span must be <= 256, got {self.max_span}")
        if not 0 <= self.budget <= 4096:
            raise ValueError(f"budget must be in 0..4096, got {self.budget}")
        if not 1 <= self.max_depth <= 256:
            raise ValueError(f"max_depth must be in 1..256, got {self.max_depth}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        # The engine's form of these parameters, made once (not a field: no part of equality,
        # repr or asdict): building it on every search cost a noticeable part of a search.
        object.__setattr__(self, "_query", (self.min_span, self.max_span, self.budget, self.max_depth,
                                            self.policy))


@dataclass(frozen=True)
class SearchResult:
    """The continuation tree found for one context.

    Node ``i`` holds ``tokens[i]``; ``parents[i]`` is the index of its parent node, or -1 when the
    node follows the matched suffix directly. Parents always come before their children.
    ``counts[i]`` is the number of occurrences of ``suffix + path to node i``. ``match_length == 0``
    means no suffix of at least ``min_span`` tokens occurs: the tree is empty.

    ``cut_count``: the largest count of a node the budget left out (a node at most ``max_depth``
    deep whose parent is in the tree, or that follows the suffix directly, but which is not in the
    tree itself); 0 when nothing was left out, and always 0 for the "rest" policy. No node within
    ``max_depth`` missing from the tree has a larger count. ``shard``: the shards a search was
    restricted to, joined by commas (empty: all of them); ``searched_shards``: the shards the
    answer covers, when the retrieval service says (empty when not reported). Two results are
    equal when their trees are: which shards reported is where an answer came from, not what it
    says, so ``searched_shards`` takes no part in comparisons.
    """

    match_length: int
    occurrences: int
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()
    shard: str = ""
    cut_count: int = 0
    searched_shards: tuple[str, ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_engine(
        cls,
        raw: tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
        shard: str,
        searched_shards: tuple[str, ...],
    ) -> SearchResult:
        """The result for the engine's ``(match_length, occurrences, tokens, parents, counts,
        cut_count)``. Equal to calling the class; made without its generated ``__init__``,
        which sets each field of a frozen dataclass through ``object.__setattr__`` and cost
        more than a search (about 1.5 us of the 5 a search may take)."""
        result = object.__new__(cls)
        fields = result.__dict__
        (fields["match_length"], fields["occurrences"], fields["tokens"], fields["parents"],
         fields["counts"], fields["cut_count"]) = raw
        fields["shard"] = shard
        fields["searched_shards"] = searched_shards
        return result

    def paths(self) -> list[tuple[int, ...]]:
        """Every node's root-to-node token path (handy for tests and debugging)."""
        out: list[tuple[int, ...]] = []
        for token, parent in zip(self.tokens, self.parents):
            out.append((out[parent] if parent >= 0 else ()) + (token,))
        return out


EMPTY_RESULT = SearchResult(match_length=0, occurrences=0)


@dataclass(frozen=True)
class DatastoreInfo:
    """What a client needs to know about a datastore before using it."""

    format_version: int
    vocab_size: int
    n_tokens: int
    n_docs: int
    tokenizer_name: str
    tokenizer_fingerprint: str
    shards: tuple[str, ...] = field(default_factory=tuple)
