"""decoder/model_support.py: what can be verified losslessly is accepted, the rest is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    MambaConfig,
    Qwen2Config,
    T5Config,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from decoder import RestGenerator, UnsupportedModelError, load_model
from decoder.model_support import attention_window, check_architecture, check_model
from rest.tokenizer import tokenizer_fingerprint
from tests.decoder.helpers import (
    ARCHS,
    ATTENTIONS,
    hf_greedy,
    make_model,
    make_tokenizer,
    model_config,
)


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_supported_models_pass_the_probe(arch: str, attn: str) -> None:
    check_model(make_model(arch, attn))


def causal_only(module, query, key, value, attention_mask, **kwargs):
    """An attention that ignores the mask it is given (as flash attention does with 4D masks)."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def test_attention_that_ignores_4d_masks_is_refused() -> None:
    AttentionInterface.register("causal_only", causal_only)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        model_config("llama"), attn_implementation="causal_only"
    ).eval()
    with pytest.raises(UnsupportedModelError, match="ignores the 4D mask"):
        RestGenerator(model, make_tokenizer())


def test_recurrent_models_are_refused() -> None:
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=96, hidden_size=16, state_size=4, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="state-space"):
        RestGenerator(model, make_tokenizer())


def test_hybrid_linear_attention_layers_are_refused() -> None:
    config = model_config("qwen2")
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        check_architecture(config)


def test_flash_attention_and_encoder_decoders_are_refused() -> None:
    config = model_config("llama")
    config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        check_architecture(config)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        check_architecture(T5Config())


def test_attention_window() -> None:
    assert attention_window(model_config("llama")) is None
    assert attention_window(model_config("gpt2")) is None
    assert attention_window(model_config("mistral")) == 4096  # Mistral's default: every layer
    assert attention_window(model_config("qwen2")) is None  # use_sliding_window=False
    hybrid = Qwen2Config(use_sliding_window=True, sliding_window=32, max_window_layers=1,
                         num_hidden_layers=2)  # fmt: skip
    assert hybrid.layer_types == ["full_attention", "sliding_attention"]
    assert attention_window(hybrid) == 32


def test_load_model_from_a_saved_directory(tmp_path) -> None:
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), "float32", attn_implementation="eager")
    assert type(loaded).__name__ == "Qwen3ForCausalLM" and not loaded.training
    assert loaded.dtype == torch.float32 and loaded.config._attn_implementation == "eager"
    assert tokenizer_fingerprint(loaded_tokenizer) == tokenizer_fingerprint(tokenizer)
    prompt = [5, 6, 7]
    result = RestGenerator(loaded, loaded_tokenizer).generate(prompt, 10)
    assert result.tokens == hf_greedy(model, prompt, 10)
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tmp_path), dtype="float8")
