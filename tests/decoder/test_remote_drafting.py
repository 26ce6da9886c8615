"""Drafting through replicated, sharded retrieval servers equals drafting in-process: the same
drafts every step (so the same steps and draft tokens), and the output of plain decoding."""

import pytest

from decoder import DecodingConfig, RestGenerator
from rest.datastore import Datastore, build_datastore
from rest.retriever import LocalRetriever
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from retriever_service.client import RemoteRetriever
from retriever_service.replicas import ReplicaPolicy
from retriever_service.server import BackgroundServer, ServerConfig
from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer, prompts


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt_list = prompts(3, seed=11)
    # The model's own continuations, and noise, over several shards: drafts are partly right.
    docs = [p + hf_greedy(model, p, 40) for p in prompt_list] * 2
    docs += [[(7 * i + j) % (VOCAB - 3) + 3 for j in range(60)] for i in range(20)]
    path = tmp_path_factory.mktemp("drafting") / "ds"
    build_datastore(path, docs, vocab_size=VOCAB, tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), shard_tokens=400)
    return model, tokenizer, prompt_list, path


def test_remote_drafting_equals_in_process_drafting(setting):
    model, tokenizer, prompt_list, path = setting
    names = Datastore.open(path).shard_names
    assert len(names) >= 3
    # Fixed budget and no deadlines: the drafts must not depend on timing for this comparison.
    config = DecodingConfig(budget=16, retrieval_levels=3, retrieval_deadline_s=None,
                            served_drafts=False)
    groups = [names[:1], names[1:]]
    servers = [BackgroundServer(ServerConfig(datastore=str(path), port=0),
                                Datastore.open(path, shards=group))
               for group in groups for _ in range(2)]  # two replicas of each shard set
    try:
        remote = RemoteRetriever([f"127.0.0.1:{s.port}" for s in servers], deadline_s=10,
                                 policy=ReplicaPolicy(min_deadline_s=10))
        local = LocalRetriever(str(path))
        for prompt in prompt_list:
            expected = hf_greedy(model, prompt, 40)
            runs = [RestGenerator(model, tokenizer, retriever, config).generate(prompt, 40)
                    for retriever in (local, remote)]
            for run in runs:
                assert run.tokens == expected
            (in_process, through_servers) = (r.stats for r in runs)
            assert (through_servers.steps, through_servers.draft_tokens) == (
                in_process.steps, in_process.draft_tokens)
            assert through_servers.retrieval_failures == 0
            assert in_process.steps < len(expected)  # the datastore's drafts were accepted
        remote.close()
    finally:
        for server in servers:
            server.stop()


def test_a_retriever_down_at_the_start_costs_no_wait_and_is_used_once_it_answers(setting,
                                                                                  caplog):
    """The servers are not up when the generator is made: no 10 s wait, no traceback, plain
    steps (with one warning) and the plain output; once a server answers, its drafts are used."""
    import logging
    import time

    from tests.retriever_service.service_testing import free_port, wait_until

    model, tokenizer, prompt_list, path = setting
    port = free_port()
    config = DecodingConfig(budget=16, retrieval_deadline_s=None, served_drafts=False,
                            context_drafts=False)
    remote = RemoteRetriever(f"127.0.0.1:{port}", deadline_s=5, info_timeout_s=0.5,
                             policy=ReplicaPolicy(min_deadline_s=5))
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING):
            generator = RestGenerator(model, tokenizer, remote, config)
            prompt = prompt_list[0]
            expected = hf_greedy(model, prompt, 40)
            down = generator.generate(prompt, 40)
        assert time.monotonic() - started < 5.0
        assert down.tokens == expected
        assert down.stats.steps == len(expected)  # no datastore drafts while it was down
        assert sum("does not answer" in r.message for r in caplog.records) == 1
        server = BackgroundServer(ServerConfig(datastore=str(path), port=port),
                                  Datastore.open(path))
        try:
            def drafting() -> bool:
                result = generator.generate(prompt, 40)
                assert result.tokens == expected
                return result.stats.steps < len(expected)
            assert wait_until(drafting, timeout=15.0, interval=0.2)
        finally:
            server.stop()
    finally:
        remote.close()
