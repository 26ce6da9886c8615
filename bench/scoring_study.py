"""Scoring variants of the decoder's drafting, measured on the replay workload (bench/replay.py).

Every variant sees the same levels the decoder's reference drafting (``drafting="python"``)
gets: the context, the served outputs and the datastore, tagged by source. A step's levels
depend only on the context and on the targets replayed before (the served outputs), not on the
policy, so each target's levels are computed once, for every position, and every variant
replays the target from them. A variant turns a step's tagged levels into a draft tree of at
most ``budget`` nodes; it may keep state across the steps of one target (one generation) and
is told, after each step, the tokens the step made known (the accepted path and the next
root), as a decoder would know them.

M is given over all the problems and over each half (problems 0-81, 82-163), so that what is
fitted on the first half is judged on the second.

Run ``python -m bench.scoring_study --help``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from bench import replay as R
from bench.replay import DecoderPolicy, Tree, accepted_length, decoder_config
from decoder.draft_sources import ContextDraftSource, ServedDraftSource, open_draft_sources
from decoder.draft_tree import DraftTree, Level

Tagged = list[tuple[str, Level]]  # (source: "context" / "served" / "datastore", level)


def source_name(source) -> str:
    inner = getattr(source, "source", source)  # a GuardedDraftSource's own
    return {ContextDraftSource: "context", ServedDraftSource: "served"}.get(type(inner), "datastore")


def first_tokens(level: Level) -> dict[int, float]:
    """The level's first tokens with their counts."""
    out: dict[int, float] = {}
    if level.trie is not None:
        for token, parent, count in zip(*level.trie):
            if parent < 0:
                out[int(token)] = out.get(int(token), 0.0) + float(count)
    else:
        column = level.rows[:, 0]
        for token, count in zip(*np.unique(column[column >= 0], return_counts=True)):
            out[int(token)] = float(count)
    return out


# ---------------------------------------------------------------------------------------------
# Variants


class Variant:
    """Turns one step's tagged levels into a tree; ``start`` opens a generation, ``learn`` is
    told what the step made known: ``known`` = the true tokens after the root, as many as the
    step accepted plus one (the next root)."""

    def start(self) -> None:
        return None

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        raise NotImplementedError

    def learn(self, tagged: Tagged, known: Sequence[int]) -> None:
        return None


class Default(Variant):
    """The decoder's scoring (``DraftTree.from_levels``)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        return DraftTree.from_levels([level for _, level in tagged], budget=budget,
                                     vocab_size=self.vocab_size)


class ShallowForShortMatch(Default):
    """The default scoring, the tree cut to ``factor`` x the longest match length (SuffixDecoding's
    tree size rule); fewer nodes can only lose tokens, what is measured is how many."""

    def __init__(self, vocab_size: int, factor: float) -> None:
        super().__init__(vocab_size)
        self.factor = factor

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        longest = max((level.match_length for _, level in tagged), default=0)
        size = min(budget, max(1, math.ceil(self.factor * longest)))
        return super().tree(tagged, size)


class EmpiricalPaths(Variant):
    """SuffixDecoding's scoring over every level at once: a node's score is the highest, over
    the levels listing its path, of count(path) / occurrences of the level's match (the
    empirical path probability), times ``weight[source]``; ties go to the longer match. With
    ``min_occurrences``, a level seen fewer times is scaled by occurrences / min_occurrences."""

    def __init__(self, weight: dict[str, float] | None = None, min_occurrences: float = 0.0) -> None:
        self.weight = weight or {}
        self.min_occurrences = min_occurrences

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        best: dict[tuple[int, ...], float] = {}
        for name, level in tagged:
            occ = max(level.occurrences, 1)
            scale = self.weight.get(name, 1.0) * (min(1.0, occ / self.min_occurrences)
                                                   if self.min_occurrences else 1.0)
            # tiny bonus for the longer match breaks ties toward it
            bonus = 1.0 + 1e-9 * level.match_length
            for path, count in level.counts().items():
                s = scale * count / occ * bonus
                if s > best.get(path, 0.0):
                    best[path] = s
        return tree_from_scores(best, budget)


class SingleBestLevel(Variant):
    """SuffixDecoding's choice: the one level whose best ``budget`` paths have the highest
    summed empirical probability (its expected accepted length) gives the whole tree."""

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        best = (0.0, 0, {})
        for _, level in tagged:
            occ = max(level.occurrences, 1)
            scores = {path: count / occ for path, count in level.counts().items()}
            tree = tree_from_scores(scores, budget)
            total = sum(tree.scores)
            if (total, level.match_length) > best[:2]:
                best = (total, level.match_length, scores)
        return tree_from_scores(best[2], budget)


def tree_from_scores(scores: dict[tuple[int, ...], float], budget: int) -> DraftTree:
    """The ``budget`` best paths (each with its prefixes: a path's score is capped by its
    parent's, so the kept set is a tree), parents before children."""
    capped: dict[tuple[int, ...], float] = {}
    for path in sorted(scores, key=len):
        parent = capped.get(path[:-1], math.inf) if len(path) > 1 else math.inf
        if len(path) > 1 and path[:-1] not in capped:
            continue
        capped[path] = min(scores[path], parent)
    ranked = sorted(capped, key=lambda p: (-capped[p], len(p)))[:budget]
    ranked.sort(key=len)
    number = {}
    tokens, parents, out_scores = [], [], []
    for path in ranked:
        number[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(number[path[:-1]] if len(path) > 1 else -1)
        out_scores.append(capped[path])
    return DraftTree(tokens, parents, out_scores)


def bucket(name: str, match_length: int) -> tuple[str, int]:
    return name, min(match_length, 8) if name == "datastore" else min(match_length, 4)


class OnlineCalibration(Default):
    """Per generation, how often each (source, match bucket)'s most counted first token was the
    right one at the earlier steps; a level's trust is multiplied by (prior / online)^gamma,
    the online rate shrunk toward the prior with ``pseudo`` pseudo-steps. ``priors``: the
    rate of each bucket over the fitting half (``fit_priors``)."""

    def __init__(self, vocab_size: int, priors: dict, gamma: float, pseudo: float,
                 by_bucket: bool = True, listed: bool = False) -> None:
        super().__init__(vocab_size)
        self.listed = listed
        self.priors = priors
        self.gamma = gamma
        self.pseudo = pseudo
        self.by_bucket = by_bucket

    def key(self, name: str, level: Level):
        return bucket(name, level.match_length) if self.by_bucket else (name, -1)

    def start(self) -> None:
        self.stats: dict = {}

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        levels = []
        for name, level in tagged:
            key = self.key(name, level)
            prior = self.priors.get(key, 0.3)
            hits, trials = self.stats.get(key, (0, 0))
            rate = (hits + self.pseudo * prior) / (trials + self.pseudo)
            factor = (max(prior, 1e-3) / max(rate, 1e-3)) ** self.gamma
            levels.append(replace(level, trust=level.trust * factor))
        return DraftTree.from_levels(levels, budget=budget, vocab_size=self.vocab_size)

    def learn(self, tagged: Tagged, known: Sequence[int]) -> None:
        for name, level in tagged:
            firsts = first_tokens(level)
            if not firsts:
                continue
            if self.listed:
                hit = known[0] in firsts
            else:
                hit = max(firsts, key=lambda t: (firsts[t], -t)) == known[0]
            key = self.key(name, level)
            hits, trials = self.stats.get(key, (0, 0))
            self.stats[key] = (hits + hit, trials + 1)


class RecentSourceFirst(Default):
    """The first node is the most counted first token of the source that was right most
    recently (its best first token equal to the next token at the latest step it proposed at:
    ``rule="recent"``), or of the level with the longest match (``rule="longest"``); the rest
    by the default scoring."""

    def __init__(self, vocab_size: int, rule: str) -> None:
        super().__init__(vocab_size)
        self.rule = rule

    def start(self) -> None:
        self.last_right: dict[str, int] = {}
        self.step = 0

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        full = DraftTree.from_levels([level for _, level in tagged], vocab_size=self.vocab_size)
        if budget >= len(full) or not tagged:
            return full
        choice = None
        if self.rule == "longest":
            name, level = max(tagged, key=lambda nl: nl[1].match_length)
            choice = level
        else:
            recent = sorted(self.last_right.items(), key=lambda kv: -kv[1])
            for name, _ in recent:
                mine = [lv for n, lv in tagged if n == name]
                if mine:
                    choice = max(mine, key=lambda lv: lv.match_length)
                    break
        ranking = full.ranking()
        kept = ranking[:budget]
        if choice is not None:
            firsts = first_tokens(choice)
            if firsts:
                top = max(firsts, key=lambda t: (firsts[t], -t))
                node = next((j for j in range(len(full)) if full.parents[j] < 0
                             and full.tokens[j] == top), None)
                if node is not None and node not in kept:
                    kept = kept[:-1] + [node]  # the last kept is a leaf: nothing below it ranks higher
        return _subtree(full, sorted(kept))

    def learn(self, tagged: Tagged, known: Sequence[int]) -> None:
        self.step += 1
        for name, level in tagged:
            firsts = first_tokens(level)
            if firsts and max(firsts, key=lambda t: (firsts[t], -t)) == known[0]:
                self.last_right[name] = self.step


class InContext(Variant):
    """A cache model: the conditional of a node whose token occurs in the context (the prompt
    and the output so far; within the last ``window`` tokens when given) is multiplied by
    ``boost``, of one whose token does not by ``damp`` (capped at 1), for the nodes of the
    sources in ``sources`` (nodes the context source lists keep theirs unless "context" is
    among them); scores re-chained, the ``budget`` best kept."""

    def __init__(self, vocab_size: int, boost: float, damp: float = 1.0,
                 sources: tuple[str, ...] = ("datastore", "served"), window: int | None = None,
                 max_depth: int = 99, rare: int | None = None, frequency=None,
                 trusts: dict[str, float] | None = None, damp_rare: int | None = None) -> None:
        self.trusts = trusts
        self.damp_rare = damp_rare
        self.vocab_size = vocab_size
        self.rare, self.frequency = rare, frequency
        self.boost, self.damp, self.sources, self.window = boost, damp, set(sources), window
        self.max_depth = max_depth

    def tree(self, tagged: Tagged, budget: int) -> DraftTree:
        full, listing, context = tagged.full  # type: ignore[attr-defined]
        if self.trusts:  # the same paths, numbered alike: only the scores change
            full = DraftTree.from_levels(
                [replace(lv, trust=lv.trust * self.trusts.get(n, 1.0)) for n, lv in tagged],
                vocab_size=self.vocab_size)
        seen = set(context[-self.window:] if self.window else context)
        scores: list[float] = []
        depth: list[int] = []
        for j, (token, parent) in enumerate(zip(full.tokens, full.parents)):
            above = scores[parent] if parent >= 0 else 1.0
            before = full.scores[parent] if parent >= 0 else 1.0
            cond = full.scores[j] / before if before > 0 else 0.0
            d = depth[parent] + 1 if parent >= 0 else 1
            names = set(listing[j].split("+"))
            if d <= self.max_depth and names & self.sources and ("context" not in names
                                                                  or "context" in self.sources):
                hit = token in seen and (self.rare is None or self.frequency(token) < self.rare)
                if hit:
                    cond = min(1.0, cond * self.boost)
                elif token not in seen and (self.damp_rare is None
                                            or self.frequency(token) < self.damp_rare):
                    cond *= self.damp
            scores.append(above * cond)
            depth.append(d)
        rescored = DraftTree(full.tokens, full.parents, scores)
        return rescored.prune(budget)


def _subtree(full: DraftTree, kept: list[int]) -> DraftTree:
    new = {old: n for n, old in enumerate(kept)}
    return DraftTree([full.tokens[i] for i in kept],
                     [new[full.parents[i]] if full.parents[i] >= 0 else -1 for i in kept],
                     [full.scores[i] for i in kept])


class VariantPolicy(DecoderPolicy):
    """A variant as a replay policy (``python -m bench.replay --policies scoring-...``): the
    reference drafting's sources, their levels tagged and turned into a tree by ``variant``.
    What the previous step made known is what the context has gained since it."""

    def __init__(self, datastore, budget: int, vocab_size: int | None, variant: Variant) -> None:
        super().__init__(datastore, decoder_config(budget, drafting="python"), vocab_size)
        self.variant = variant
        self._last: tuple[Tagged, int] | None = None

    def propose(self, context: Sequence[int]) -> Tree:
        if self.sources is None:
            self.sources = open_draft_sources(self.config, self.retriever, self.served)
            self.variant.start()
            self._last = None
        if self._last is not None:
            self.variant.learn(self._last[0], list(context[self._last[1]:]))
        tagged = Step([(source_name(s), level) for s in self.sources for level in s.propose(context)],
                      list(context), self.vocab_size)
        self._last = (tagged, len(context))
        tree = self.variant.tree(tagged, self.config.tree_budget)
        return Tree(tuple(tree.tokens), tuple(tree.parents))

    def observe(self, sequence: Sequence[int], prompt_len: int) -> None:
        super().observe(sequence, prompt_len)
        self._last = None


# The variants the replay knows by name (``bench.replay.SCORING_VARIANTS``), best settings of
# each kind: (vocab_size, datastore) -> Variant.
NAMED: dict[str, Callable] = {
    "scoring-empirical-paths": lambda vocab, ds: EmpiricalPaths(min_occurrences=4),
    "scoring-single-best-level": lambda vocab, ds: SingleBestLevel(),
    "scoring-shallow-x2": lambda vocab, ds: ShallowForShortMatch(vocab, 2.0),
    "scoring-first-node-recent": lambda vocab, ds: RecentSourceFirst(vocab, "recent"),
    "scoring-first-node-longest": lambda vocab, ds: RecentSourceFirst(vocab, "longest"),
    "scoring-online-g1-k16": lambda vocab, ds: OnlineCalibration(vocab, fit_priors(), 1.0, 16.0),
    "scoring-in-context-x2-datastore": lambda vocab, ds: InContext(vocab, 2.0, sources=("datastore",)),
    "scoring-in-context-rare3000-x4": lambda vocab, ds: InContext(
        vocab, 4.0, rare=3000, frequency=corpus_frequency(ds)),
    "scoring-in-context-x1.2-damp0.4": lambda vocab, ds: InContext(vocab, 1.2, 0.4),
}


def make_policy(name: str, datastore, budget: int, vocab_size: int | None) -> VariantPolicy:
    return VariantPolicy(datastore, budget, vocab_size, NAMED[name](vocab_size, datastore))


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class Tally:
    tokens: list[int] = field(default_factory=list)  # per target
    steps: list[int] = field(default_factory=list)

    def m(self, part: slice = slice(None)) -> float:
        return sum(self.tokens[part]) / max(sum(self.steps[part]), 1)


class Step(list):
    """One position's tagged levels; ``full``: (the whole scored tree, per node the sources
    listing it joined with "+", the context), made when first asked for."""

    def __init__(self, items, context, vocab_size) -> None:
        super().__init__(items)
        self.context = context
        self.vocab_size = vocab_size
        self._full = None

    @property
    def full(self):
        if self._full is None:
            from bench.replay import _listing_sources

            tree = DraftTree.from_levels([lv for _, lv in self], vocab_size=self.vocab_size)
            self._full = (tree, [names for names, _ in _listing_sources(self, tree)], self.context)
        return self._full


def all_levels(sources, tokens: Sequence[int], prompt_len: int, vocab_size=None) -> list[Tagged]:
    """Every position's tagged levels (position i: context ``tokens[:i+1]``)."""
    out = []
    for i in range(prompt_len, len(tokens)):
        context = tokens[: i + 1]
        out.append(Step([(source_name(s), level) for s in sources for level in s.propose(context)],
                        context, vocab_size))
    return out


def study(variants: dict[str, Callable[[], Variant]], budgets: Sequence[int],
          limit: int | None = None, on_step=None) -> dict[tuple[str, int], Tally]:
    workload = R.load_workload()
    targets = workload.targets[:limit] if limit else workload.targets
    return study_on(workload, targets, variants, budgets, on_step)


def study_on(workload, targets, variants, budgets, on_step=None) -> dict[tuple[str, int], Tally]:
    from rest.datastore import Datastore

    feeder = DecoderPolicy(Datastore.open(workload.datastore_path),
                           decoder_config(64, drafting="python"), workload.vocab_size)
    made = {(name, b): make() for name, make in variants.items() for b in budgets}
    tallies = {key: Tally() for key in made}
    for number, target in enumerate(targets):
        tokens = list(target.tokens)
        sources = open_draft_sources(feeder.config, feeder.retriever, feeder.served)
        cached = all_levels(sources, tokens, target.prompt_len, workload.vocab_size)
        for source in sources:
            source.close()
        for (name, budget), variant in made.items():
            variant.start()
            i, steps = target.prompt_len, 0
            while i < len(tokens):
                tagged = cached[i - target.prompt_len]
                tree = variant.tree(tagged, budget)
                if len(tree) > budget:
                    raise AssertionError(f"{name}: {len(tree)} nodes over the budget {budget}")
                accepted = accepted_length(Tree(tuple(tree.tokens), tuple(tree.parents)), tokens, i)
                steps += 1
                if on_step is not None:
                    on_step(name, budget, number, tagged, tokens, i, accepted)
                if i + 1 + accepted < len(tokens):  # a next step, which may use it
                    variant.learn(tagged, tokens[i + 1 : i + 2 + accepted])
                i += 1 + accepted
            tallies[name, budget].tokens.append(len(tokens) - target.prompt_len)
            tallies[name, budget].steps.append(steps)
        feeder.served.add(tokens[target.prompt_len :])
        if number % 20 == 19:
            print(f"  {number + 1} targets", file=sys.stderr, flush=True)
    return tallies


def fit_priors(limit_half: int = 82) -> dict:
    """The rate at which each (source, match bucket)'s most counted first token is right, over
    every position of the first ``limit_half`` problems."""
    counts: dict = {}

    class Count(Variant):
        def tree(self, tagged, budget):
            return DraftTree.empty()

    def on_step(name, budget, number, tagged, tokens, i, accepted):
        for source, level in tagged:
            firsts = first_tokens(level)
            if not firsts or i + 1 >= len(tokens):
                continue
            top = max(firsts, key=lambda t: (firsts[t], -t))
            for key in (bucket(source, level.match_length), (source, -1)):
                hits, trials = counts.get(key, (0, 0))
                counts[key] = (hits + (top == tokens[i + 1]), trials + 1)
                hits, trials = counts.get(("listed", *key), (0, 0))
                counts[("listed", *key)] = (hits + (tokens[i + 1] in firsts), trials + 1)

    study({"count": Count}, [1], limit=limit_half, on_step=on_step)
    return {key: hits / trials for key, (hits, trials) in counts.items() if trials}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scoring_study",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--set", default="all",
                        choices=("all", "offline", "suffix", "first", "cache", "cache2", "rare",
                                 "damp", "damp2", "damp-rare", "trusts", "online", "listed"),
                        help="which variants (default: all; see variant_set)")
    args = parser.parse_args(argv)
    vocab = R.load_workload().vocab_size
    variants = variant_set(args.set, vocab)
    tallies = study(variants, args.budgets, args.limit)
    half = 82
    print(f"{'variant':<32} {'budget':>6} {'M all':>7} {'M 1st':>7} {'M 2nd':>7}")
    for (name, budget), t in tallies.items():
        print(f"{name:<32} {budget:>6} {t.m():7.3f} {t.m(slice(0, half)):7.3f} "
              f"{t.m(slice(half, None)):7.3f}")
    return 0


def corpus_frequency(datastore=None) -> Callable[[int], int]:
    """A token's occurrences in the datastore (those followed by a token), cached."""
    from rest.datastore import Datastore
    from rest.types import SearchParams

    datastore = datastore or Datastore.open(R.load_workload().datastore_path)
    params = SearchParams(min_span=1, max_span=1, budget=1, max_depth=1)
    known: dict[int, int] = {}

    def frequency(token: int) -> int:
        if token not in known:
            known[token] = datastore.search([token], params).occurrences
        return known[token]

    return frequency


def variant_set(which: str, vocab: int) -> dict[str, Callable[[], Variant]]:
    """The variants of a set: "suffix" (SuffixDecoding's scoring and tree sizes), "first" (who
    gets the first node), "cache", "cache2", "rare" (candidates already in the context boosted),
    "damp", "damp2", "trusts" (those boosted, the others damped; with other trusts), "damp-rare"
    (only the rare ones damped), "online",
    "listed" (per-generation calibration, priors fitted on problems 0-81), "offline" (suffix,
    first, cache: nothing fitted on the workload), "all"; each with the default."""
    out: dict[str, Callable[[], Variant]] = {"default": lambda: Default(vocab)}
    offline = ("suffix", "first", "cache")

    def wants(group: str) -> bool:
        return which in ("all", group) or (which == "offline" and group in offline)

    if wants("suffix"):
        out["shallow-x1"] = lambda: ShallowForShortMatch(vocab, 1.0)
        out["shallow-x2"] = lambda: ShallowForShortMatch(vocab, 2.0)
        out["empirical-paths"] = lambda: EmpiricalPaths()
        out["empirical-paths-min4"] = lambda: EmpiricalPaths(min_occurrences=4)
        out["single-best-level"] = lambda: SingleBestLevel()
    if wants("first"):
        out["first-node-recent"] = lambda: RecentSourceFirst(vocab, "recent")
        out["first-node-longest"] = lambda: RecentSourceFirst(vocab, "longest")
    if wants("cache"):
        for boost in (1.5, 2.0, 3.0):
            out[f"in-context-x{boost:g}"] = lambda b=boost: InContext(vocab, b)
        out["in-context-x2-damp0.7"] = lambda: InContext(vocab, 2.0, 0.7)
        out["in-context-x2-d1"] = lambda: InContext(vocab, 2.0, max_depth=1)
        out["in-context-x2-datastore"] = lambda: InContext(vocab, 2.0, sources=("datastore",))
        out["in-context-x2-all"] = lambda: InContext(vocab, 2.0, sources=("datastore", "served", "context"))
        out["in-context-x2-last64"] = lambda: InContext(vocab, 2.0, window=64)
    if wants("cache2"):
        for boost in (2.0, 3.0, 4.0, 6.0):
            out[f"in-context-x{boost:g}"] = lambda b=boost: InContext(vocab, b)
            out[f"in-context-x{boost:g}-datastore"] = lambda b=boost: InContext(
                vocab, b, sources=("datastore",))
        out["in-context-x3-damp0.8"] = lambda: InContext(vocab, 3.0, 0.8)
    if wants("damp"):
        for boost, damp in ((1.0, 0.7), (1.0, 0.5), (1.5, 0.7), (2.0, 0.5), (2.0, 0.8),
                            (1.5, 0.5), (2.0, 0.6)):
            out[f"in-context-x{boost:g}-damp{damp:g}"] = lambda b=boost, d=damp: InContext(
                vocab, b, d)
        out["in-context-x2-damp0.7-datastore"] = lambda: InContext(
            vocab, 2.0, 0.7, sources=("datastore",))
        out["in-context-x2-damp0.7-d1"] = lambda: InContext(vocab, 2.0, 0.7, max_depth=1)
    if wants("damp2"):
        for boost, damp in ((1.0, 0.3), (1.0, 0.2), (1.5, 0.3), (1.5, 0.2), (1.2, 0.4),
                            (2.0, 0.3)):
            out[f"in-context-x{boost:g}-damp{damp:g}"] = lambda b=boost, d=damp: InContext(
                vocab, b, d)
        out["in-context-x1.5-damp0.5-datastore"] = lambda: InContext(
            vocab, 1.5, 0.5, sources=("datastore",))
        out["in-context-x1.5-damp0.5-served"] = lambda: InContext(
            vocab, 1.5, 0.5, sources=("served",))
    if wants("trusts"):
        for trusts in ({"datastore": 0.5}, {"datastore": 2.0}, {"served": 0.67}, {"served": 1.33},
                       {"context": 0.5}, {"context": 2.0}, {"datastore": 0.5, "served": 0.67}):
            label = "-".join(f"{n}{m:g}" for n, m in trusts.items())
            out[f"in-context-x1.2-damp0.4-{label}"] = lambda t=trusts: InContext(
                vocab, 1.2, 0.4, trusts=t)
    if wants("damp-rare"):
        frequency = corpus_frequency()
        for rare in (1000, 10000, 100000):
            for boost, damp in ((1.2, 0.4), (1.5, 0.3), (1.0, 0.2)):
                out[f"in-context-x{boost:g}-damp{damp:g}-rare{rare}"] = (
                    lambda b=boost, d=damp, r=rare: InContext(vocab, b, d, frequency=frequency,
                                                              damp_rare=r))
    if wants("rare"):
        frequency = corpus_frequency()
        for rare in (300, 3000, 30000):
            for boost in (2.0, 4.0, 8.0):
                out[f"in-context-rare{rare}-x{boost:g}"] = lambda b=boost, r=rare: InContext(
                    vocab, b, rare=r, frequency=frequency)
        out["in-context-rare3000-x4-datastore"] = lambda: InContext(
            vocab, 4.0, sources=("datastore",), rare=3000, frequency=frequency)
    if wants("online"):
        priors = fit_priors()
        print("priors (first half):", {k: round(v, 3) for k, v in sorted(priors.items())},
              file=sys.stderr)
        for gamma in (0.5, 1.0, 2.0):
            for pseudo in (4.0, 16.0):
                out[f"online-g{gamma}-k{pseudo:g}"] = (
                    lambda g=gamma, k=pseudo: OnlineCalibration(vocab, priors, g, k))
        out["online-source-g1-k8"] = lambda: OnlineCalibration(
            vocab, priors, 1.0, 8.0, by_bucket=False)
    if wants("online") or wants("listed"):
        priors = priors if wants("online") else fit_priors()
        listed = {k[1:]: v for k, v in priors.items() if k[0] == "listed"}
        for gamma in (0.5, 1.0, 2.0):
            out[f"online-listed-g{gamma}-k8"] = lambda g=gamma: OnlineCalibration(
                vocab, listed, g, 8.0, listed=True)
        out["online-listed-source-g1-k8"] = lambda: OnlineCalibration(
            vocab, listed, 1.0, 8.0, by_bucket=False, listed=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
