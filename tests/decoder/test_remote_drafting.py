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
