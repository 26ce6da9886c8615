"""An in-process datastore whose shard file another process truncates in the middle of a
generation: the process lives, the searches on that shard fail, and those steps become plain
steps: the output is exactly plain greedy decoding."""

import random
import subprocess
import time

import pytest

from decoder import DecodingConfig, RestGenerator
from rest.datastore import Datastore, build_datastore
from rest.retriever import LocalRetriever
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from tests.decoder.helpers import VOCAB, hf_greedy, make_model, make_tokenizer, prompts


def truncate_like_an_operator(path, size: int) -> None:
    """coreutils truncate, retried: a read lease makes its O_NONBLOCK open fail with EAGAIN once,
    while the datastore lets the file go."""
    deadline = time.monotonic() + 15
    while subprocess.run(["truncate", "-s", str(size), str(path)]).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("watching", ["lease", "fault-guard-only"])
def test_a_shard_truncated_mid_generation_changes_nothing(tmp_path, watching):
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts(1, seed=4)[0]
    expected = hf_greedy(model, prompt, 48)
    # The model's own continuation (drafts are accepted), among enough other text that the
    # shard spans many pages: a truncated page is then one a search reads.
    rng = random.Random(0)
    filler = [[rng.randrange(3, VOCAB) for _ in range(500)] for _ in range(200)]
    path = tmp_path / "ds"
    build_datastore(path, [prompt + expected] * 3 + filler, vocab_size=VOCAB,
                    tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    retriever = LocalRetriever(str(path))
    if watching == "fault-guard-only":  # no lease, no inotify: the SIGBUS guard alone
        retriever.datastore = Datastore.open(path, leases=False, inotify=False)
    generator = RestGenerator(model, tokenizer, retriever, DecodingConfig(budget=16,
                                                                          context_drafts=False))
    stream = generator.stream(prompt, 48)
    tokens = []
    for step, chunk in enumerate(stream):
        tokens += chunk.tokens
        if step == 1:
            assert len(tokens) > 2  # drafts from the datastore were accepted before the change
            truncate_like_an_operator(path / "shard-00000.rds", 1000)
    result = stream.result
    assert tokens == result.tokens == expected
    assert result.stats.retrieval_failures > 0
    reason = retriever.datastore.shard_states()["shard-00000"]
    if watching == "lease":  # taken out of service before the truncation
        assert reason is not None and "lease" in reason, reason
    else:  # a search read past the new end: SIGBUS, caught
        assert reason is not None and "from" in reason and "to 1000 bytes while mapped" in reason, reason
