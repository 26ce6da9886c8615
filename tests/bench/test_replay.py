"""bench/replay.py: the replay rule on hand-made targets and trees, and the policies' contracts."""

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import replay as R
from bench.replay import (
    DecoderPolicy,
    NoDraftPolicy,
    Policy,
    PromptLookupPolicy,
    Target,
    Tree,
    UnionPolicy,
    accepted_length,
    as_tree,
    decoder_config,
    replay,
    union,
)
from rest.datastore import Datastore, build_datastore

_counter = itertools.count()


def tiny_datastore(tmp_path, docs, vocab_size=32):
    out = tmp_path / f"ds{next(_counter)}"
    build_datastore(out, docs, vocab_size=vocab_size, tokenizer_name="test", tokenizer_fingerprint="fp")
    return Datastore.open(out)


class Oracle(Policy):
    """Cheats on purpose (it holds the target): proposes the next ``k`` tokens."""

    def __init__(self, target, k):
        self.target, self.k = list(target), k

    def propose(self, context):
        i = len(context) - 1
        return [tuple(self.target[i + 1 : i + 1 + self.k])]


class Spy(Policy):
    def __init__(self):
        self.events = []

    def propose(self, context):
        self.events.append(("propose", tuple(context)))
        context.append(999)  # a policy scribbling on its context must not change the replay
        return [(999,)]

    def observe(self, sequence, prompt_len):
        self.events.append(("observe", tuple(sequence), prompt_len))


# --- the replay rule --------------------------------------------------------------------------


def test_accepted_length_is_the_deepest_matching_path():
    tree = Tree.from_paths([(5, 6, 7), (5, 8), (9,)])
    target = [1, 2, 5, 6, 9]  # root target[1] = 2, then 5 6 match, 7 does not
    assert accepted_length(tree, target, 1) == 2
    assert accepted_length(tree, target, 0) == 0  # nothing starts with target[1] = 2
    assert accepted_length(Tree(), target, 1) == 0


def test_accepted_length_stops_at_the_end_of_the_target():
    tree = Tree.from_paths([(5, 6, 7, 8)])
    assert accepted_length(tree, [2, 5, 6], 0) == 2


def test_accepted_length_follows_parents_not_order():
    # Two children with the same token under different parents: only the matching branch counts.
    tree = Tree(tokens=(1, 2, 3, 3, 4), parents=(-1, -1, 0, 1, 3))
    assert accepted_length(tree, [0, 2, 3, 4], 0) == 3
    assert accepted_length(tree, [0, 1, 3, 4], 0) == 2


def test_a_perfect_drafter_scores_k_plus_one_tokens_per_step():
    target = Target(tuple(range(100, 112)) + tuple(range(10)), prompt_len=12)  # 10 scored tokens
    result = replay(Oracle(target.tokens, k=3), [target])
    assert result.scored_tokens == 10
    assert result.steps == 3  # 4 + 4 + 2
    assert result.m == pytest.approx(10 / 3)
    assert result.mean_nodes == pytest.approx(7 / 3)  # chains of 3, 3, then 1 (the last token)


def test_an_empty_drafter_gives_m_1():
    targets = [Target((1, 2, 3, 4, 5), 2), Target((7, 7, 7), 0)]
    result = replay(NoDraftPolicy(), targets)
    assert (result.m, result.steps, result.scored_tokens, result.mean_nodes) == (1.0, 6, 6, 0.0)


def test_m_is_pooled_over_targets_not_averaged():
    a = Target(tuple(range(9)), prompt_len=1)  # 8 scored: perfect chains of 3 -> 2 steps
    b = Target((50, 51, 52), prompt_len=1)  # 2 scored: 1 step
    result = replay(_OraclePerTarget({a.tokens: Oracle(a.tokens, 3), b.tokens: Oracle(b.tokens, 3)}), [a, b])
    assert (result.scored_tokens, result.steps) == (10, 3)
    assert result.m == pytest.approx(10 / 3)


class _OraclePerTarget(Policy):
    def __init__(self, oracles):
        self.oracles = oracles

    def propose(self, context):
        (oracle,) = [o for t, o in self.oracles.items() if list(t[: len(context)]) == list(context)]
        return oracle.propose(context)


def test_a_policy_sees_only_the_past_and_observes_a_target_after_it():
    targets = [Target((1, 2, 3, 4, 5, 6), 3), Target((9, 8, 7), 1)]
    spy = Spy()
    result = replay(spy, targets)
    assert result.m == 1.0  # the spy's 999 never matches, and its scribbling changed nothing
    proposes = [e[1] for e in spy.events if e[0] == "propose"]
    # Context = target[:i+1] for every scored position i, nothing longer.
    assert proposes == [(1, 2, 3, 4), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6), (9, 8), (9, 8, 7)]
    kinds = [e[0] for e in spy.events]
    assert kinds == ["propose"] * 3 + ["observe"] + ["propose"] * 2 + ["observe"]
    assert spy.events[3] == ("observe", (1, 2, 3, 4, 5, 6), 3)


# --- trees ------------------------------------------------------------------------------------


def test_from_paths_shares_prefixes():
    tree = Tree.from_paths([(1, 2), (1, 3), (1, 2, 4), (5,)])
    assert tree.tokens == (1, 2, 3, 4, 5)
    assert tree.parents == (-1, 0, 0, 1, -1)
    assert sorted(tree.paths()) == [(1,), (1, 2), (1, 2, 4), (1, 3), (5,)]


def test_a_tree_rejects_a_parent_after_its_child():
    with pytest.raises(ValueError):
        Tree(tokens=(1, 2), parents=(1, -1))


def test_as_tree_takes_trees_tries_and_paths():
    class Trie:  # e.g. a rest.types.SearchResult
        tokens, parents = (4, 5), (-1, 0)

    assert as_tree(Trie()) == Tree((4, 5), (-1, 0))
    assert as_tree([(4, 5)]) == Tree((4, 5), (-1, 0))


def test_union_keeps_each_path_once_in_first_seen_order():
    merged = union([Tree.from_paths([(1, 2)]), Tree.from_paths([(1, 3), (4,)])])
    assert sorted(merged.paths()) == [(1,), (1, 2), (1, 3), (4,)]
    assert merged.tokens[:2] == (1, 2)


def test_union_policy_cuts_to_the_budget_keeping_earlier_policies_first():
    class Fixed(Policy):
        def __init__(self, paths):
            self.paths = paths

        def propose(self, context):
            return self.paths

    policy = UnionPolicy(Fixed([(1, 2, 3)]), Fixed([(7,), (8,), (1, 9)]), budget=4)
    tree = policy.propose([0])
    assert sorted(tree.paths()) == [(1,), (1, 2), (1, 2, 3), (7,)]


# --- prompt lookup ----------------------------------------------------------------------------


def test_prompt_lookup_takes_the_first_occurrence_and_prefers_the_bigram():
    policy = PromptLookupPolicy(max_ngram=2, num_output_tokens=3)
    # bigram (1, 2) occurs at 0 and 4: the first one wins, 3 tokens after it.
    assert policy.propose([1, 2, 7, 8, 1, 2, 5, 1, 2]).tokens == (7, 8, 1)
    # no earlier (9, 2): the unigram 2's first occurrence wins.
    assert policy.propose([2, 6, 9, 2]).tokens == (6, 9, 2)
    assert policy.propose([3, 4]).tokens == ()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.integers(1, 3), st.integers(1, 6))
def test_prompt_lookup_matches_hugging_face(context, max_ngram, num_output_tokens):
    torch = pytest.importorskip("torch")
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    hf = PromptLookupCandidateGenerator(
        eos_token_id=torch.tensor([1000]), num_output_tokens=num_output_tokens,
        max_matching_ngram_size=max_ngram, max_length=10**6,
    )
    ids = torch.tensor([context])
    candidates, _ = hf.get_candidates(ids)
    expected = tuple(candidates[0, len(context) :].tolist())
    got = PromptLookupPolicy(max_ngram, num_output_tokens).propose(context)
    assert got.tokens == expected
    assert got.parents == tuple(range(-1, len(expected) - 1))


# --- the decoder's drafting, end to end on a tiny datastore ------------------------------------


def _walk(policy, targets, stride):
    """Proposals at every ``stride``-th position of each target (not just where a replay would
    stop), then ``observe``, as a replay does: {(target number, i): tree}."""
    trees = {}
    for number, target in enumerate(targets):
        for i in range(target.prompt_len, len(target.tokens), stride):
            trees[(number, i)] = policy.propose(list(target.tokens[: i + 1]))
        policy.observe(target.tokens, target.prompt_len)
    return trees


@pytest.mark.parametrize("stride", [1, 3])
def test_decoder_policy_never_looks_ahead(tmp_path, stride):
    """Runs whose targets agree up to a point propose the same trees up to that point: what
    follows the context in the current target cannot matter."""
    ds = tiny_datastore(tmp_path, [[1, 2, 3, 4, 5, 6], [2, 3, 9, 9, 4], [5, 6, 7, 1, 2, 3]])
    first = Target((1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5), 2)
    second = Target((4, 5, 6, 7, 1, 2, 3, 9, 9, 4, 5, 6), 1)
    first_changed = Target(first.tokens[:8] + (20, 21, 1, 2, 3), 2)
    second_changed = Target(second.tokens[:6] + (11, 12, 4, 5, 6), 1)
    config = decoder_config(budget=8)
    base = _walk(DecoderPolicy(ds, config), [first, second], stride)
    checks = 0
    for targets, agree in [([first_changed, second], {0: 8}), ([first, second_changed], {0: 99, 1: 6})]:
        other = _walk(DecoderPolicy(ds, config), targets, stride)
        for (number, i), tree in base.items():
            if number in agree and i < agree[number]:  # context target[:i+1] is shared
                assert other[(number, i)] == tree, (number, i)
                checks += 1
    assert checks >= 8
    assert any(len(tree) for tree in base.values())  # the policy did propose something
    assert all(len(tree) <= 8 for tree in base.values())


def test_decoder_policy_learns_from_served_outputs_only_after_serving_them(tmp_path):
    ds = tiny_datastore(tmp_path, [[30, 31]])
    target = Target((1,) + tuple(range(10, 22)), 1)  # nothing in the datastore or the prompt helps
    served = DecoderPolicy(ds, decoder_config(budget=16))
    first = replay(served, [target])
    assert first.m == 1.0
    again = replay(served, [target])  # the same output served before: now predictable
    assert again.m > 3.0
    assert again.search_seconds is None  # searched inside the engine's one call per step
    reference = DecoderPolicy(ds, decoder_config(budget=16, drafting="python"))
    assert replay(reference, [target]).m == first.m
    again = replay(reference, [target])
    assert again.m > 3.0 and again.search_seconds > 0  # the datastore was searched, and timed
    blind = DecoderPolicy(ds, decoder_config(budget=16, served_drafts=False))
    replay(blind, [target])
    assert replay(blind, [target]).m == 1.0


def test_decoder_policy_stays_within_its_budget(tmp_path):
    ds = tiny_datastore(tmp_path, [[i % 7, (i * 3) % 11] * 5 for i in range(40)], vocab_size=16)
    target = Target(tuple((i * 5) % 11 for i in range(60)), 10)
    for budget in (0, 1, 5, 16):
        result = replay(DecoderPolicy(ds, decoder_config(budget=budget)), [target])
        assert result.max_nodes <= budget
    assert replay(DecoderPolicy(ds, decoder_config(budget=16)), [target]).max_nodes > 5


def test_decoder_policy_without_the_datastore_searches_nothing(tmp_path):
    ds = tiny_datastore(tmp_path, [[1, 2, 3, 4, 5, 6]])
    target = Target((1, 2, 3, 4, 5, 6), 1)
    with_ds = replay(DecoderPolicy(ds, decoder_config(budget=8)), [target])
    without = replay(DecoderPolicy(ds, decoder_config(budget=8), use_datastore=False), [target])
    assert with_ds.m > without.m == 1.0
    assert without.search_seconds == 0.0


# --- the CLI on a tiny workload ---------------------------------------------------------------


@pytest.fixture
def tiny_workload(tmp_path, monkeypatch) -> None:
    """``load_workload`` answers a two-target workload on an 11-token datastore."""
    ds_path = tmp_path / "ds"
    build_datastore(ds_path, [[1, 2, 3, 4, 5, 6, 7], [3, 4, 5, 9]], vocab_size=16, tokenizer_name="t",
                    tokenizer_fingerprint="fp")
    targets = (Target((1, 2, 3, 4, 5, 6, 7, 3, 4, 5), 2), Target((9, 3, 4, 5, 6, 7), 1))
    workload = R.Workload(ds_path, corpus_tokens=11, targets=targets, vocab_size=16)
    monkeypatch.setattr(R, "load_workload", lambda fraction=(1, 1): workload)


def test_cli_prints_the_table_and_writes_json_and_a_sweep_chart(tmp_path, tiny_workload, capsys):
    out_json = tmp_path / "out.json"
    chart = tmp_path / "sweep.png"
    assert R.main(["--policies", "rest", "exact", "decoder", "decoder-python", "--json", str(out_json),
                   "--sweep", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "policy" in printed and "decoder" in printed and "search" in printed
    data = json.loads(out_json.read_text())
    rows = {r["policy"]: r for r in data["results"]}
    assert rows["rest"]["ratio_to_rest"] == pytest.approx(1.0)
    assert rows["exact"]["M"] >= 1.0 and rows["decoder"]["steps"] > 0
    assert rows["decoder-python"]["search_us_per_step"] >= 0 and rows["rest"]["search_us_per_step"] is None
    assert rows["decoder"]["M"] == rows["decoder-python"]["M"]  # the engine drafts the reference's trees
    assert data["decoder_config"]["retrieval_levels"] == 3
    assert len(data["sweep"]) == 4 * 4
    assert chart.read_bytes()[:4] == b"\x89PNG"


# --- SuffixDecoding ---------------------------------------------------------------------------


def test_suffix_trie_counts_every_suffix_up_to_its_depth():
    trie = R.SuffixTrie(max_depth=3)
    trie.extend([1, 2])
    trie.extend([1, 2, 3])  # the sequence is 1 2 1 2 3, added in two parts
    assert trie.find([1])[0] == 2 and trie.find([1, 2])[0] == 2 and trie.find([2])[0] == 2
    assert trie.find([1, 2, 3])[0] == 1 and trie.find([2, 1, 2])[0] == 1
    assert trie.find([1, 2, 1]) is not None and trie.find([1, 2, 1, 2]) is None  # depth 3 at most
    assert trie.find([3, 1]) is None
    trie.end_sequence()
    trie.extend([3, 1])  # a new sequence: 3 1 occurs now, 2 3 1 still does not
    assert trie.find([3, 1])[0] == 1 and trie.find([2, 3, 1]) is None


def test_suffix_decoding_grows_by_empirical_path_probability():
    policy = R.SuffixDecodingPolicy(budget=64, max_depth=8, max_spec_factor=2.0, min_token_prob=0.2)
    # Served: after 5 6, three times 7 8 and once 9.
    for output in ([5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 9]):
        policy.observe([0, *output], 1)
    tree = policy.propose([40, 5, 6])
    # Pattern 5 6 (p = 2): D(7) = 3/4, D(7 8) = 3/4, D(9) = 1/4; at most 2 * 2 = 4 nodes.
    assert sorted(tree.paths()) == [(7,), (7, 8), (9,)]
    assert tree.tokens[:2] == (7, 8)
    short = R.SuffixDecodingPolicy(budget=64, max_depth=8, max_spec_factor=1.0, min_token_prob=0.2)
    for output in ([5, 6, 7, 8], [5, 6, 9]):
        short.observe([0, *output], 1)
    # Pattern 5 6: 1 x 2 = 2 nodes, D(7) = D(9) = 1/2, D(7 8) = 1/2: the first two by order.
    assert len(short.propose([40, 5, 6])) == 2


def test_suffix_decoding_stops_below_the_min_token_prob_and_at_the_budget():
    policy = R.SuffixDecodingPolicy(budget=1, max_depth=8, max_spec_factor=4.0, min_token_prob=0.3)
    for output in ([5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 1], [5, 6, 2]):
        policy.observe([0, *output], 1)
    assert policy.propose([5, 6]).tokens == (7,)  # D(7) = 1/2; the budget allows one node
    policy.budget = 64
    assert sorted(policy.propose([5, 6]).paths()) == [(7,)]  # 1/4 for 1, 2, 7 8 and 7 9: < 0.3


def test_suffix_decoding_drafts_from_the_current_sequence_and_forgets_it_after():
    policy = R.SuffixDecodingPolicy(budget=8)
    assert len(policy.propose([3, 4, 5, 3])) == 1  # 3 was followed by 4: D = 1/2
    assert policy.propose([3, 4, 5, 3, 4]).tokens[:1] == (5,)  # pattern 3 4 (p = 2): 5
    policy.observe([3, 4, 5, 3, 4], 5)  # nothing scored: nothing served
    assert len(policy.propose([9, 3])) == 0  # a new sequence; 3 was in the old one only


def test_budget_sweep_prints_a_table_and_draws_the_curve(tmp_path, tiny_workload, capsys):
    out_json, chart = tmp_path / "budgets.json", tmp_path / "budgets.png"
    assert R.main(["--policies", "exact", "suffix-decoding", "decoder", "--budgets", "1", "4",
                   "--json", str(out_json), "--chart", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "B=1" in printed and "B=4" in printed and "suffix-decoding" in printed
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["budget"], r["policy"]) for r in rows] == [
        (1, "exact"), (1, "suffix-decoding"), (1, "decoder"), (4, "exact"), (4, "suffix-decoding"), (4, "decoder")]
    assert all(r["max_nodes"] <= r["budget"] for r in rows)
    assert chart.read_bytes()[:4] == b"\x89PNG"


# --- where the budget's trees lose ------------------------------------------------------------


def test_loss_tracer_drafts_the_decoders_trees_and_counts_what_the_best_subtree_would_accept(tmp_path):
    ds = tiny_datastore(tmp_path, [[1, 2, 3, 4, 5, 6], [2, 3, 9, 9, 4], [5, 6, 7, 1, 2, 3]])
    targets = [Target((1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 9, 9), 2), Target((4, 5, 6, 7, 1, 2, 3, 4, 5), 1)]
    config = decoder_config(budget=2)
    tracer = R.LossTracer(ds, config)
    traced = replay(tracer, targets)
    assert traced.m == replay(DecoderPolicy(ds, config), targets).m  # the same trees
    losses = tracer.losses
    assert losses.steps == traced.steps
    assert losses.accepted == traced.scored_tokens - traced.steps  # each step: root + accepted
    assert losses.accepted <= losses.oracle <= 2 * losses.steps
    short = sum(losses.first_missed.values()) + losses.too_shallow
    assert (short > 0) == (losses.oracle > losses.accepted)
    assert sum(losses.first_missed_sources.values()) == sum(losses.first_missed.values())
    assert all(right <= nodes for nodes, right, _ in losses.calibration.values())
    assert f"budget 2: {losses.steps} steps" in losses.report()


def test_loss_tracer_finds_the_right_first_token_left_out():
    """Two first tokens, the wrong one scored higher: a budget of 1 keeps it, the oracle the other."""
    losses = R.Losses(budget=1)
    full = R.DraftTree([5, 6, 7], [-1, -1, 1], [0.6, 0.3, 0.2])
    listing = [("datastore", 2), ("context", 1), ("context", 1)]
    losses.add(full, listing, [0, 1, 6, 7], 1)  # root target[1]; the path is 6 7
    assert (losses.accepted, losses.oracle) == (0, 1)
    assert losses.first_missed == {"2": 1} and losses.first_missed_sources == {"context": 1}
    assert losses.calibration[("context", 1, 1)] == [1, 1, pytest.approx(0.3)]
    assert losses.calibration[("context", 1, 2)] == [1, 1, pytest.approx(0.2 / 0.3)]
    assert losses.calibration[("datastore", 2, 1)] == [1, 0, pytest.approx(0.6)]


def test_cli_losses_prints_the_report(tiny_workload, capsys):
    assert R.main(["--losses", "--budget", "2"]) == 0
    printed = capsys.readouterr().out
    assert "budget 2:" in printed and "best 2-node subtrees" in printed and "calibration" in printed
