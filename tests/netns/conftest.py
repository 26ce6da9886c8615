"""Fixtures of the multi-host tests: the machine's support, a network per test, the workload."""

from __future__ import annotations

import json

import pytest

from tests.netns.network import Network, probe_support

_support = None


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "netns: multi-host tests in Linux network namespaces (need root, iproute2)")


def support():
    global _support
    if _support is None:
        _support = probe_support()
    return _support


@pytest.fixture
def net(request, tmp_path):
    """A ``Network`` of namespaces for this test, removed at its end; every program's stderr goes
    into the test's report."""
    found = support()
    if found.missing:
        pytest.skip(found.missing)
    network = Network(tmp_path, netem=found.netem)
    yield network
    for label, text in network.close().items():
        if text.strip():
            request.node.add_report_section("call", f"stderr of {label}", text[-5000:])


@pytest.fixture(scope="session")
def workload(tmp_path_factory):
    """Prompts, their plain greedy outputs, and a datastore of those outputs and noise in four
    shards (its drafts are often accepted)."""
    from rest.datastore import Datastore, build_datastore
    from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
    from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer

    if support().missing:
        pytest.skip(support().missing)
    model, tokenizer = make_model("llama"), make_tokenizer()
    import random

    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (4, 9, 13, 6)]
    cases = [{"prompt": p, "max_new_tokens": 40, "expected": hf_greedy(model, p, 40)}
             for p in prompts]
    docs = [c["prompt"] + c["expected"] for c in cases] * 2
    docs += [[rng.randrange(3, VOCAB) for _ in range(80)] for _ in range(30)]
    folder = tmp_path_factory.mktemp("netns")
    path = folder / "ds"
    build_datastore(path, docs, vocab_size=VOCAB, tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), shard_tokens=800)
    shards = Datastore.open(path).shard_names
    assert len(shards) >= 4
    spec = folder / "workload.json"
    spec.write_text(json.dumps({"datastore": str(path), "cases": cases}))
    return {"path": path, "shards": shards, "spec": spec}
