"""decoder/settings.py: the settings ``generate`` would use, the model's own generation config first."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from decoder import DecodingConfig, RestGenerator, UnsupportedGenerationError
from decoder.settings import DEFAULT_MAX_NEW_TOKENS, resolve_settings
from tests.decoder.helpers import EOS, hf_greedy, make_model, make_tokenizer, prompts

PROMPT = prompts()[2]


def fresh_model(arch: str = "llama"):
    # A fresh instance: the cached models are shared and must not be modified.
    return make_model.__wrapped__(arch, "sdpa")


def rest(model, *args, **kwargs):
    generator = RestGenerator(model, make_tokenizer(), config=DecodingConfig(budget=16))
    return generator.generate(PROMPT, *args, **kwargs)


def test_a_repetition_penalty_shipped_in_the_generation_config_applies() -> None:
    model = fresh_model()
    plain = hf_greedy(model, PROMPT, 30)
    model.generation_config.repetition_penalty = 1.3
    want = hf_greedy(model, PROMPT, 30)
    assert want != plain  # the penalty matters for this model
    assert rest(model, 30).tokens == want
    assert rest(model, 30, repetition_penalty=1.0).tokens == plain  # the call overrides it


def test_no_eos_in_the_generation_config_means_none() -> None:
    model = fresh_model()
    full = hf_greedy(model, PROMPT, 30)
    assert EOS in full  # the model's own EOS ends it early...
    model.generation_config.eos_token_id = None
    assert model.config.eos_token_id == EOS  # ... even though the model config still has one
    want = hf_greedy(model, PROMPT, 30)
    assert len(want) == 30 and EOS in want
    result = rest(model, 30)
    assert result.tokens == want and result.finish_reason == "length"


def test_a_generation_config_object_and_its_keywords() -> None:
    model = fresh_model("qwen2")
    config = GenerationConfig(max_new_tokens=25, repetition_penalty=1.2, no_repeat_ngram_size=3)
    with torch.inference_mode():
        out = model.generate(torch.tensor([PROMPT]), generation_config=config, pad_token_id=0)
    want = out[0, len(PROMPT) :].tolist()
    assert rest(model, config).tokens == want
    assert rest(model, max_new_tokens=25, repetition_penalty=1.2, no_repeat_ngram_size=3,
                ).tokens == want  # fmt: skip


def test_sampling_defaults_come_from_the_model() -> None:
    model = fresh_model()
    model.generation_config.update(do_sample=True, temperature=0.7, top_p=0.8)
    settings = resolve_settings(model, PROMPT)
    names = [type(p).__name__ for p in settings.processors]
    assert not settings.greedy
    assert names == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    assert settings.processors[1].top_k == 50  # transformers' default
    assert resolve_settings(model, PROMPT, options={"temperature": 0}).greedy
    assert resolve_settings(model, PROMPT, options={"do_sample": False}).greedy


def test_min_p_typical_p_and_the_others_are_transformers_own_processors() -> None:
    model = fresh_model()
    settings = resolve_settings(model, PROMPT, options=dict(
        do_sample=True, min_p=0.1, typical_p=0.9, top_k=0, epsilon_cutoff=1e-3,
        repetition_penalty=1.1, min_new_tokens=3, suppress_tokens=[7]))  # fmt: skip
    names = {type(p).__name__ for p in settings.processors}
    # min_new_tokens also sets min_length (prompt + 3), as generate does: both processors.
    assert names == {"MinPLogitsWarper", "TypicalLogitsWarper", "EpsilonLogitsWarper",
                     "RepetitionPenaltyLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
                     "MinLengthLogitsProcessor", "SuppressTokensLogitsProcessor"}  # fmt: skip


def test_temperature_above_zero_samples_unless_told_otherwise() -> None:
    model = make_model("llama")
    assert not resolve_settings(model, PROMPT, options={"temperature": 0.5}).greedy
    assert resolve_settings(model, PROMPT, options={"temperature": 0.5, "do_sample": False}).greedy


def test_max_new_tokens_from_the_call_the_config_or_the_default() -> None:
    model = fresh_model()
    model.generation_config.eos_token_id = None
    assert len(rest(model).tokens) == DEFAULT_MAX_NEW_TOKENS
    assert len(rest(model, max_length=len(PROMPT) + 9).tokens) == 9
    model.generation_config.max_new_tokens = 7
    assert len(rest(model).tokens) == 7
    assert len(rest(model, 5).tokens) == 5  # the older positional form


def test_what_a_tree_cannot_reproduce_is_refused_before_generation() -> None:
    model = make_model("llama")
    for options, message in [
        ({"num_beams": 3}, "beam"),
        ({"penalty_alpha": 0.6, "top_k": 4}, "contrastive"),
        ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences"),
        ({"guidance_scale": 1.5}, "guidance"),
    ]:
        with pytest.raises(UnsupportedGenerationError, match=message):
            resolve_settings(model, PROMPT, options=options)
    with pytest.raises(ValueError, match="unknown generation option"):
        resolve_settings(model, PROMPT, options={"temprature": 0.5})
    with pytest.raises(ValueError, match="top_p"):
        resolve_settings(model, PROMPT, options={"top_p": 1.5})
    with pytest.raises(ValueError, match="seed"):
        resolve_settings(model, PROMPT, options={"seed": "7"})
