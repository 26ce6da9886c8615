"""decoder/batch.py: requests that join a batch while others run decode exactly as alone."""

from __future__ import annotations

import random

from decoder import DecodingConfig, RestGenerator
from decoder.batch import BatchDecoder, SequenceRequest
from tests.decoder.helpers import VOCAB, make_model, make_tokenizer


def test_requests_joining_a_running_batch_decode_as_alone() -> None:
    generator = RestGenerator(make_model("llama"), make_tokenizer(), None, DecodingConfig(budget=8))
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 12))] for _ in range(7)]
    alone = [generator.generate(p, max_new_tokens=16).tokens for p in prompts]
    decoder = BatchDecoder(generator, max_batch=4)
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    sizes = []

    def step() -> None:
        updates, stats = decoder.step()
        sizes.append(decoder.num_running)
        for update in updates:
            out[update.request_id] += update.tokens

    for i, prompt in enumerate(prompts):
        decoder.add(SequenceRequest(f"r{i}", prompt, 16, drafting=i % 3 != 0))
        if i % 2 == 1:
            step()  # the next requests join a batch that is running
    while decoder.has_work:
        step()
    assert [out[f"r{i}"] for i in range(len(prompts))] == alone
    assert max(sizes) == 4  # several sequences ran together, never more than max_batch
