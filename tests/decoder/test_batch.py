"""decoder/batch.py: many sequences in one forward pass per step, each exactly as alone."""

from __future__ import annotations

import random

import pytest
import torch

from decoder import (
    BatchDecoder,
    DecodingConfig,
    RestGenerator,
    SequenceRequest,
    UnsupportedGenerationError,
)
from decoder.budget import CostModel
from decoder.testing import InMemoryRetriever
from rest.tokenizer import tokenizer_fingerprint
from tests.decoder.architectures import arch_model, reset_rope
from tests.decoder.helpers import (
    EOS,
    FunctionSource,
    chi_square_pvalue,
    hf_greedy,
    make_model,
    make_tokenizer,
    random_source,
    sampling_probs,
    sampling_settings,
    scored_level,
)


def run(decoder: BatchDecoder, joining: dict[int, list[SequenceRequest]] = {},
        aborting: dict[int, list[str]] = {}) -> tuple[dict, dict, list]:  # fmt: skip
    """Step until done, adding ``joining[step]`` and aborting ``aborting[step]`` before that
    step. Returns (tokens by request, finish reason by request, step statistics)."""
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    stats = []
    step = 0
    while decoder.has_work or any(s >= step for s in joining):
        for request in joining.get(step, []):
            decoder.add(request)
        for request_id in aborting.get(step, []):
            decoder.abort(request_id)
        updates, step_stats = decoder.step()
        stats.append(step_stats)
        for update in updates:
            assert update.request_id not in reasons  # nothing after the end
            tokens.setdefault(update.request_id, []).extend(update.tokens)
            if update.finish_reason is not None:
                reasons[update.request_id] = update.finish_reason
                assert update.stats is not None
                assert update.stats.new_tokens == len(tokens[update.request_id])
        step += 1
    return tokens, reasons, stats


def prompt_of(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 96) for _ in range(length)]


# Eight requests of different lengths; the later ones join while the first ones run.
LENGTHS = [(3, 30), (17, 12), (8, 40), (25, 5), (1, 20), (12, 33), (30, 18), (5, 26)]
JOIN_AT = [0, 0, 0, 1, 3, 3, 6, 9]


def requests() -> list[SequenceRequest]:
    return [SequenceRequest(f"r{i}", prompt_of(n, seed=i), new) for i, (n, new) in
            enumerate(LENGTHS)]  # fmt: skip


BATCHED = ["llama", "mistral", "qwen2-some-sliding", "gemma2", "gpt_neo-local", "gpt2",
           "phi3-longrope", "llama-dynamic-ntk"]  # fmt: skip


@pytest.mark.parametrize("max_batch", [2, 4, 8])
@pytest.mark.parametrize("name", BATCHED)
def test_each_sequence_equals_its_own_generate_as_requests_join_and_leave(name, max_batch):
    attn = "eager" if name == "gpt_neo-local" else "sdpa"
    model = arch_model(name, attn)
    tokenizer = make_tokenizer()
    wanted = {}
    for request in requests():
        reset_rope(model)
        wanted[request.request_id] = hf_greedy(model, request.prompt_ids, request.max_new_tokens)
    # Drafts that are right for some sequences (their own outputs) and random for all.
    oracle = InMemoryRetriever([r.prompt_ids + wanted[r.request_id] for r in requests()[::2]],
                               tokenizer_fingerprint(tokenizer))  # fmt: skip
    generator = RestGenerator(model, tokenizer, oracle, DecodingConfig(budget=16),
                              draft_sources=[random_source(3, size=6)])  # fmt: skip
    decoder = BatchDecoder(generator, max_batch=max_batch)
    joining: dict[int, list[SequenceRequest]] = {}
    for request, step in zip(requests(), JOIN_AT):
        joining.setdefault(step, []).append(request)
    tokens, reasons, stats = run(decoder, joining)
    assert tokens == wanted
    assert all(reasons[r] == "length" for r in wanted)
    assert min(max_batch, 4) <= max(s.batch_size for s in stats) <= max_batch
    assert sum(s.accepted_draft_tokens for s in stats) > 20  # the drafts were used
    assert sum(s.emitted_tokens for s in stats) == sum(len(t) for t in wanted.values())
    assert not decoder.has_work and decoder.num_running == decoder.num_waiting == 0


def test_an_aborted_request_leaves_and_the_others_go_on() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    generator = RestGenerator(model, tokenizer, config=DecodingConfig(budget=8))
    decoder = BatchDecoder(generator, max_batch=2)
    reqs = requests()[:3]
    want = {r.request_id: hf_greedy(model, r.prompt_ids, r.max_new_tokens) for r in reqs}
    tokens, reasons, _ = run(decoder, {0: reqs}, aborting={2: ["r0", "r2"]})
    # r0 was running, r2 still waiting (the batch holds two): both end with "abort".
    assert reasons == {"r0": "abort", "r1": "length", "r2": "abort"}
    assert tokens["r1"] == want["r1"]
    assert 0 < len(tokens["r0"]) < len(want["r0"]) and tokens["r0"] == want["r0"][: len(tokens["r0"])]
    assert tokens.get("r2", []) == []


def test_eos_and_stop_end_one_sequence_of_a_batch() -> None:
    model, tokenizer = make_model("qwen2"), make_tokenizer()
    generator = RestGenerator(model, tokenizer, config=DecodingConfig(budget=8))
    decoder = BatchDecoder(generator, max_batch=4)
    prompts = [prompt_of(6, seed=s) for s in range(4)]
    full = [hf_greedy(model, p, 24) for p in prompts]
    stop = full[1][3:5]
    reqs = [SequenceRequest("a", prompts[0], 24), SequenceRequest("b", prompts[1], 24, stop=(stop,)),
            SequenceRequest("c", prompts[2], 24, generation={"eos_token_id": [full[2][4], EOS]}),
            SequenceRequest("d", prompts[3], 24, drafting=False)]  # fmt: skip
    tokens, reasons, _ = run(decoder, {0: reqs})
    assert tokens["a"] == full[0]
    assert reasons["b"] == "stop" and tokens["b"] == full[1][:5]
    cut = full[2].index(full[2][4])
    assert reasons["c"] == "eos" and tokens["c"] == full[2][: cut + 1]
    assert tokens["d"] == full[3]


def test_sampled_sequences_follow_plain_sampling_in_a_full_batch() -> None:
    # 400 requests through a batch of 4 (continuous batching: each joins as one leaves), each
    # with its own seed; three-token continuations under top-2 sampling, with a tree whose first
    # token is shared by two paths after the prefill's token.
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompt_of(9, seed=4)
    options = dict(temperature=1.0, top_k=2)
    settings = sampling_settings(model, prompt, options)
    exact, first = {}, sampling_probs(model, settings, prompt)
    for a in first.nonzero().flatten().tolist():
        second = sampling_probs(model, settings, prompt + [a])
        for b in second.nonzero().flatten().tolist():
            third = sampling_probs(model, settings, prompt + [a, b])
            for c in third.nonzero().flatten().tolist():
                exact[(a, b, c)] = (first[a] * second[b] * third[c]).item()
    a, b, c = max(exact, key=exact.get)
    other = [t for t in sampling_probs(model, settings, prompt + [a]).nonzero().flatten().tolist()
             if t != b][0]  # fmt: skip
    tree = scored_level((b, c, other), (-1, 0, -1), (0.6, 0.5, 0.3))
    source = FunctionSource(lambda context: [tree] if list(context) == prompt + [a] else [])
    config = DecodingConfig(budget=8, context_drafts=False, served_drafts=False)
    generator = RestGenerator(model, tokenizer, config=config, draft_sources=[source])
    decoder = BatchDecoder(generator, max_batch=4)
    reqs = [SequenceRequest(f"s{seed}", prompt, 3, generation={**options, "seed": seed})
            for seed in range(400)]  # fmt: skip
    tokens, _, stats = run(decoder, {0: reqs})
    samples = [tuple(tokens[r.request_id]) for r in reqs]
    assert chi_square_pvalue(samples, exact) > 0.01
    assert max(s.batch_size for s in stats) == 4
    assert sum(s.accepted_draft_tokens for s in stats) > 40  # the tree was used
    alone = generator.generate(prompt, 3, seed=7, **options).tokens
    assert list(samples[7]) == alone  # a seed gives the same draws in a batch and alone


def generator_with_fictitious_costs(model, tokenizer, draft) -> RestGenerator:
    """Drafts from ``draft`` alone, with no learnt corrections, and a forward pass that costs
    1 s plus 0.25 s per token and row at every batch size up to 8."""
    generator = RestGenerator(model, tokenizer, draft_sources=[FunctionSource(draft)],
                              config=DecodingConfig(context_drafts=False, served_drafts=False,
                                                    score_correction=False,
                                                    cost_correction=False))  # fmt: skip
    for b in range(1, 9):
        generator.costs.by_batch_size[b] = CostModel((1, 65), (1.0 + b * 0.25, 1.0 + b * 65 * 0.25))
    return generator


def test_the_adaptive_budget_shrinks_trees_as_the_batch_fills() -> None:
    # A (fictitious) forward pass costs 1 s plus 0.25 s per token and row, so that the real
    # drafting time hardly counts (and no cost correction learns what real steps cost). Alone,
    # the first draft nodes pay for themselves; at 8 rows a node of the widest tree costs 2 s for
    # the batch, more than the 0.6 tokens per row it is expected to bring in: plain steps.
    model, tokenizer = make_model("llama"), make_tokenizer()

    def wrong_and_confident(context):
        return [scored_level((3, 4, 5, 6), (-1, 0, 1, 2), (0.6, 0.5, 0.4, 0.3))]

    drafted = {}
    for rows in (1, 8):
        generator = generator_with_fictitious_costs(model, tokenizer, wrong_and_confident)
        decoder = BatchDecoder(generator, max_batch=rows)
        reqs = [SequenceRequest(f"q{i}", prompt_of(5, seed=i), 10) for i in range(rows)]
        tokens, _, stats = run(decoder, {0: reqs})
        for r in reqs:
            assert tokens[r.request_id] == hf_greedy(model, r.prompt_ids, 10)
        full = [s for s in stats if s.batch_size == rows]
        drafted[rows] = sum(s.draft_tokens for s in full) / sum(s.batch_size for s in full)
    assert drafted[1] > 2 and drafted[8] == 0


def test_a_batch_where_drafting_does_not_pay_skips_drafting_and_probes_again() -> None:
    # The fictitious costs of the test above: at 8 rows no draft pays for its verification, so
    # after the first drafting step the gate skips drafting (no source is asked), then probes
    # with one drafting step after 4, 8, ... skipped ones; alone, every step drafts.
    model, tokenizer = make_model("llama"), make_tokenizer()
    asked = []

    def wrong_and_confident(context):
        asked.append(len(context))
        return [scored_level((3, 4, 5, 6), (-1, 0, 1, 2), (0.6, 0.5, 0.4, 0.3))]

    drafting_steps = {}
    for rows in (1, 8):
        generator = generator_with_fictitious_costs(model, tokenizer, wrong_and_confident)
        decoder = BatchDecoder(generator, max_batch=rows)
        # (prompts whose outputs hold no eos: the batch keeps its size)
        reqs = [SequenceRequest(f"q{i}", prompt_of(5, seed=10 + i), 24) for i in range(rows)]
        asked.clear()
        tokens, _, stats = run(decoder, {0: reqs})
        for r in reqs:
            assert tokens[r.request_id] == hf_greedy(model, r.prompt_ids, 24)
        decoding = [s for s in stats if s.batch_size == rows][1:]  # the first step only joins
        assert len(asked) % rows == 0
        drafting_steps[rows] = (len(asked) // rows, len(decoding))
    assert drafting_steps[1] == (22, 23)  # every step that has room for a draft
    # 8 rows: draft, skip 4, probe, skip 8, probe, skip the remaining 8 (of 16).
    assert drafting_steps[8] == (3, 23)


def test_bad_requests_are_refused_with_one_message() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    decoder = BatchDecoder(RestGenerator(model, tokenizer, config=DecodingConfig(budget=4)))
    cases = [
        (SequenceRequest("e", [], 4), ValueError, "empty"),
        (SequenceRequest("v", [5, 1000], 4), ValueError, "vocabulary"),
        (SequenceRequest("n", [5], 0), ValueError, "max_new_tokens"),
        (SequenceRequest("p", [5], 4, generation={"top_p": 0.0}), ValueError, "top_p"),
        (SequenceRequest("u", [5], 4, generation={"colour": "blue"}), ValueError, "colour"),
        (SequenceRequest("b", [5], 4, generation={"num_beams": 4}), UnsupportedGenerationError,
         "beam"),
        (SequenceRequest("s", [5], 4, stop=((),)), ValueError, "stop"),
    ]  # fmt: skip
    for request, error, message in cases:
        with pytest.raises(error, match=message):
            decoder.validate(request)
        with pytest.raises(error, match=message):
            decoder.add(request)
    gpt2 = RestGenerator(arch_model("gpt2", "sdpa"), tokenizer)
    with pytest.raises(ValueError, match="64 positions"):
        BatchDecoder(gpt2).validate(SequenceRequest("long", list(range(3, 63)), 10))
    decoder.add(SequenceRequest("same", [5], 4))
    with pytest.raises(ValueError, match="already"):
        decoder.add(SequenceRequest("same", [6], 4))
    assert decoder.num_waiting == 1 and decoder.has_work


def test_generate_runs_the_batched_step_with_a_batch_of_one() -> None:
    model, tokenizer = make_model("mistral"), make_tokenizer()
    config = DecodingConfig(budget=8, served_drafts=False)  # both runs draft the same trees
    generator = RestGenerator(model, tokenizer, config=config)
    prompt = prompt_of(7, seed=1)
    result = generator.generate(prompt, 20, temperature=0.8, seed=3)
    decoder = BatchDecoder(generator, max_batch=1)
    tokens, reasons, stats = run(decoder, {0: [SequenceRequest(
        "x", prompt, 20, generation={"temperature": 0.8, "seed": 3})]})  # fmt: skip
    assert tokens["x"] == result.tokens and reasons["x"] == result.finish_reason
    assert len(stats) == result.stats.steps
    with torch.inference_mode():
        assert result.tokens != hf_greedy(model, prompt, 20)  # it did sample
