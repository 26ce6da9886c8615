"""Exact on every architecture of the suite: windows, position tables, context-dependent RoPE.

Each tiny model (``tests/decoder/architectures.py``) generates past its window or threshold, or
to the very end of its position table, with drafts that are accepted (the model's own output
from a retriever, at budgets 16 and 64) and drafts that are rejected (random trees), in each
attention implementation it offers; the output must be ``model.generate``'s, token for token.
"""

from __future__ import annotations

import random

import pytest
import torch

from decoder import DecodingConfig, RestGenerator
from decoder.model_support import profile_model, sequential_logits
from decoder.testing import InMemoryRetriever
from rest.tokenizer import tokenizer_fingerprint
from tests.decoder.architectures import (
    ARCHITECTURES,
    BY_NAME,
    DYNAMIC,
    LONGROPE,
    POSITIONED,
    POSITIONS,
    THRESHOLD,
    WINDOW,
    arch_model,
    reset_rope,
)
from tests.decoder.helpers import (
    FunctionSource,
    chi_square_pvalue,
    hf_greedy,
    make_tokenizer,
    random_source,
    sampling_settings,
    scored_level,
)

PROMPT_LEN = 20
NEW_TOKENS = 44  # 64 positions: far past every window (16) and threshold (32)


def prompt_of(length: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 96) for _ in range(length)]


def model_or_skip(name: str, attn: str):
    model = arch_model(name, attn)
    if model is None:
        pytest.skip(f"{name} has no {attn} attention")
    return model


def reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    reset_rope(model)
    return hf_greedy(model, prompt, new_tokens)


def generators(model, prompt: list[int], want: list[int]) -> dict[str, RestGenerator]:
    tokenizer = make_tokenizer()
    oracle = [prompt + want]
    fingerprint = tokenizer_fingerprint(tokenizer)
    return {
        f"accepted-{budget}": RestGenerator(model, tokenizer, InMemoryRetriever(oracle, fingerprint),
                                            DecodingConfig(budget=budget))
        for budget in (16, 64)
    } | {
        "rejected-16": RestGenerator(model, tokenizer, config=DecodingConfig(budget=16),
                                     draft_sources=[random_source(1)]),
    }  # fmt: skip


def test_the_suite_covers_the_named_families() -> None:
    types = {arch.model_type for arch in ARCHITECTURES}
    named = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
             "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gptj", "gpt_neo", "gpt_neox",
             "falcon", "opt", "stablelm", "starcoder2", "cohere", "olmo", "olmo2", "gpt_bigcode",
             "granite", "deepseek_v3", "gpt_oss"}  # fmt: skip
    assert named <= types and len(types) >= 30


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", [arch.name for arch in ARCHITECTURES])
def test_greedy_output_equals_generate(name: str, attn: str) -> None:
    arch = BY_NAME[name]
    model = model_or_skip(name, attn)
    prompt = prompt_of(PROMPT_LEN)
    # A position table is used to its last row: the last token is chosen at position 63.
    new_tokens = POSITIONS - PROMPT_LEN + 1 if arch.feature == POSITIONED else NEW_TOKENS
    want = reference(model, prompt, new_tokens)
    assert len(want) == new_tokens
    for case, generator in generators(model, prompt, want).items():
        result = generator.generate(prompt, new_tokens)
        assert result.tokens == want, case
        if case.startswith("accepted") and arch.feature != DYNAMIC:
            assert result.stats.steps < new_tokens / 3, case  # the drafts were used
    if arch.feature == DYNAMIC:
        # Past the threshold plain decoding recomputes the frequencies at every token, so the
        # steps there are plain: one per token from position THRESHOLD on.
        steps = generators(model, prompt, want)["accepted-16"].generate(prompt, new_tokens).stats
        assert steps.steps >= PROMPT_LEN + new_tokens - THRESHOLD


@pytest.mark.parametrize("name", [a.name for a in ARCHITECTURES if a.feature == POSITIONED])
def test_a_request_past_the_position_table_is_refused_before_it_starts(name: str) -> None:
    model = arch_model(name, "eager")
    prompt = prompt_of(PROMPT_LEN)
    generator = RestGenerator(model, make_tokenizer(), config=DecodingConfig(budget=16))
    too_many = POSITIONS - PROMPT_LEN + 2
    with pytest.raises(ValueError, match=f"{POSITIONS} positions"):
        generator.generate(prompt, too_many)
    if name == "gpt2":  # where plain decoding itself would fail, mid-generation
        with pytest.raises(IndexError):
            hf_greedy(model, prompt, too_many)


@pytest.mark.parametrize("name", [a.name for a in ARCHITECTURES
                                  if a.feature in (DYNAMIC, LONGROPE)])  # fmt: skip
def test_a_prompt_already_past_the_rope_threshold(name: str) -> None:
    model = model_or_skip(name, "sdpa")
    prompt = prompt_of(THRESHOLD + 8, seed=2)
    want = reference(model, prompt, 30)
    for case, generator in generators(model, prompt, want).items():
        assert generator.generate(prompt, 30).tokens == want, case


def test_dynamic_ntk_starts_every_generation_from_the_pristine_rotary_state() -> None:
    # A long generation grows the frequencies; the next one, with a prompt past the threshold,
    # must not inherit them (generate on a freshly loaded model does not).
    model = model_or_skip("llama-dynamic-ntk", "sdpa")
    generator = RestGenerator(model, make_tokenizer(), config=DecodingConfig(budget=16))
    long_prompt = prompt_of(THRESHOLD + 4, seed=5)
    want = reference(model, long_prompt, 12)
    generator.generate(prompt_of(PROMPT_LEN), 90)
    assert profile_model(model).rope_modules[0].max_seq_len_cached > THRESHOLD + 16
    assert generator.generate(long_prompt, 12).tokens == want


def test_gpt_neo_local_layers_are_a_window_of_their_own() -> None:
    model = model_or_skip("gpt_neo-local", "eager")
    profile = profile_model(model)
    assert {key: pattern.window for key, pattern in profile.masks.items()} == {
        "global": None, "local": WINDOW}  # fmt: skip
    assert [key for _, key in profile.hooked_layers] == ["global", "local"]
    assert len(profile.causal_tables) == 2 and profile.position_limit == 2 * POSITIONS


# --- sampling, past windows and thresholds ---------------------------------------------------

SAMPLED = {"mistral": 24, "gemma2": 24, "gpt_neo-local": 24, "phi3-longrope": THRESHOLD + 4}
TOP_K = 2
N_SAMPLES = 400


@pytest.mark.parametrize("name", sorted(SAMPLED))
def test_sampled_continuations_follow_plain_sampling(name: str) -> None:
    # Three-token continuations under top-2 sampling (8 outcomes): the first token comes from
    # the prefill, the next two from a tree verified after a prompt wider than the window (or
    # past the threshold), whose first token is shared by two paths.
    attn = "eager" if name == "gpt_neo-local" else "sdpa"
    model = model_or_skip(name, attn)
    prompt = prompt_of(SAMPLED[name], seed=7)
    options = dict(temperature=1.0, top_k=TOP_K)
    settings = sampling_settings(model, prompt, options)

    def probs(ids):
        with torch.inference_mode():
            scores = settings.processors(torch.tensor([ids]), sequential_logits(model, ids)[None])
        return torch.softmax(scores[0], -1)

    exact, first = {}, probs(prompt)
    for a in first.nonzero().flatten().tolist():
        second = probs(prompt + [a])
        for b in second.nonzero().flatten().tolist():
            third = probs(prompt + [a, b])
            for c in third.nonzero().flatten().tolist():
                exact[(a, b, c)] = (first[a] * second[b] * third[c]).item()
    likely = max(exact, key=exact.get)
    a, b = likely[0], likely[1]
    other = [t for t in probs(prompt + [a]).nonzero().flatten().tolist() if t != b][0]
    tree = scored_level((b, likely[2], other), (-1, 0, -1), (0.6, 0.5, 0.3))
    source = FunctionSource(lambda context: [tree] if list(context) == prompt + [a] else [])
    config = DecodingConfig(budget=8, context_drafts=False, served_drafts=False)
    generator = RestGenerator(model, make_tokenizer(), config=config, draft_sources=[source])
    samples, drafted = [], 0
    for seed in range(N_SAMPLES):
        result = generator.generate(prompt, 3, seed=seed, **options)
        samples.append(tuple(result.tokens))
        drafted += result.stats.accepted_draft_tokens > 0
    assert chi_square_pvalue(samples, exact) > 0.01
    assert drafted > N_SAMPLES / 10  # the tree was used
