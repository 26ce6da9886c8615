"""bench/scoring_study.py: the study replays what the replay does, its variants stay trees."""

import pytest

from bench import replay as R
from bench import scoring_study as S
from bench.replay import Target, decoder_config, replay
from rest.datastore import Datastore, build_datastore

DOCS = [[1, 2, 3, 4, 5, 6, 7], [3, 4, 5, 9], [5, 6, 7, 1, 2, 3, 8, 8]]
TARGETS = (
    Target((1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 9, 1, 2, 3), 2),
    Target((9, 3, 4, 5, 6, 7, 8, 8, 5, 6), 1),
    Target((1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 9, 1, 2, 3), 2),  # served before: the served source helps
)


@pytest.fixture
def workload(tmp_path):
    path = tmp_path / "ds"
    build_datastore(path, DOCS, vocab_size=16, tokenizer_name="t", tokenizer_fingerprint="fp")
    return R.Workload(path, corpus_tokens=19, targets=TARGETS, vocab_size=16)


class Spy(S.Default):
    """The default scoring, recording what it is told after each step."""

    def __init__(self, vocab_size, log):
        super().__init__(vocab_size)
        self.log = log

    def start(self):
        self.log.append("start")

    def learn(self, tagged, known):
        self.log.append((len(tagged.context), tuple(known)))


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_the_study_gives_the_replays_figures_and_tells_what_each_step_made_known(workload, budget):
    reference = replay(R.DecoderPolicy(Datastore.open(workload.datastore_path),
                                       decoder_config(budget, drafting="python"), 16), TARGETS)
    study_log, policy_log = [], []
    tallies = S.study_on(workload, TARGETS, {"spy": lambda: Spy(16, study_log)}, [budget])
    assert sum(tallies["spy", budget].steps) == reference.steps
    assert tallies["spy", budget].m() == reference.m > 1.0
    policy = S.VariantPolicy(Datastore.open(workload.datastore_path), budget, 16, Spy(16, policy_log))
    assert replay(policy, TARGETS).m == reference.m
    # Both tell a step's outcome only where a next step follows (the policy learns it from the
    # next context).
    assert [e for e in study_log if e == "start"] == ["start"] * len(TARGETS)
    assert study_log == policy_log
    for entry in study_log:
        if entry != "start":
            n, known = entry
            target = next(t for t in TARGETS if len(known) and t.tokens[n : n + len(known)] == known)
            assert known and target


@pytest.mark.parametrize("name", ["empirical-paths", "single-best-level", "shallow-x2",
                                  "first-node-recent", "first-node-longest", "in-context-x2",
                                  "in-context-x2-datastore"])
def test_every_variant_stays_within_its_budget(workload, name):
    make = S.variant_set("offline", 16)[name]
    S.study_on(workload, TARGETS, {name: make}, [1, 2, 5])  # the study checks each tree's size


def test_tree_from_scores_keeps_a_tree_best_first_and_caps_a_child_by_its_parent():
    # (3, 4, 5) and (7, 7) hang from paths that are not there: dropped
    scores = {(1,): 0.5, (1, 2): 0.9, (3,): 0.6, (3, 4, 5): 0.9, (7, 7): 1.0, (8,): 0.1}
    tree = S.tree_from_scores(scores, budget=3)
    assert tree.tokens == [3, 1, 2] and tree.parents == [-1, -1, 1]
    assert tree.scores == [0.6, 0.5, 0.5]


def test_in_context_without_a_boost_is_the_default(workload):
    tallies = S.study_on(workload, TARGETS, {"default": lambda: S.Default(16),
                                             "unboosted": lambda: S.InContext(16, 1.0)}, [2, 4])
    for budget in (2, 4):
        assert tallies["default", budget].steps == tallies["unboosted", budget].steps


def test_cli_prints_m_on_all_problems_and_on_each_half(workload, monkeypatch, capsys):
    monkeypatch.setattr(R, "load_workload", lambda fraction=(1, 1): workload)
    assert S.main(["--set", "first", "--budgets", "2", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["variant", "budget", "M", "all", "M", "1st", "M", "2nd"]
    rows = {(line.split()[0], int(line.split()[1])): line.split()[2:] for line in lines[1:]}
    assert set(rows) == {(n, b) for n in ("default", "first-node-recent", "first-node-longest")
                         for b in (2, 4)}
    assert float(rows["default", 4][0]) > 1.0


def test_the_replay_knows_the_named_variants(workload):
    ds = Datastore.open(workload.datastore_path)
    for name in R.SCORING_VARIANTS:
        if "online" in name:
            continue  # its priors are fitted on the reference workload
        assert replay(R.make_policy(name, ds, 3, 16), TARGETS).max_nodes <= 3
