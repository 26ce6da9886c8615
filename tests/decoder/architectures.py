"""Tiny configurations of many architectures, each set up to cross what makes it special.

Every model has 2 layers, width 32 and 96 tokens. Windows are 16 positions, dynamic-NTK and
longrope thresholds 32 positions, learned position tables 64 positions: a prompt of 20 tokens and
a few dozen new ones cross them all. ``feature`` says which scheme an architecture exercises.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from decoder.model_support import profile_model, pristine_rope_state, restore_rope_state
from tests.decoder.helpers import EOS, VOCAB

WINDOW = 16
THRESHOLD = 32
POSITIONS = 64

FULL, WINDOWED, POSITIONED, DYNAMIC, LONGROPE, CHUNKED = (
    "full", "window", "positions", "dynamic-ntk", "longrope", "chunked",
)  # fmt: skip

COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    eos_token_id=EOS, bos_token_id=0, pad_token_id=0,
)  # fmt: skip
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)  # fmt: skip
NO_POSITIONS = ("head_dim", "max_position_embeddings")  # an alias of n_positions there
DEEPSEEK = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
                num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                n_group=1, topk_group=1, rope_scaling=None)  # fmt: skip
LONGROPE_SCALING = {"type": "longrope", "short_factor": [1.0] * 4,
                    "long_factor": [1.0 + 2.0 * i for i in range(4)]}  # fmt: skip


@dataclass(frozen=True)
class Arch:
    """One architecture of the suite: its model type, what overrides the common tiny config,
    the scheme it exercises, and the seed and weight scale that give it varied greedy output."""

    name: str
    model_type: str
    feature: str = FULL
    overrides: dict = field(default_factory=dict)
    drop: tuple[str, ...] = ()  # common keys its config does not take
    seed: int = 0
    init: float = 0.3


ARCHITECTURES = (
    Arch("llama", "llama"),
    Arch("llama-dynamic-ntk", "llama", DYNAMIC,
         dict(max_position_embeddings=THRESHOLD, rope_scaling={"rope_type": "dynamic",
                                                               "factor": 2.0})),
    Arch("mistral", "mistral", WINDOWED, dict(sliding_window=WINDOW)),
    Arch("mixtral", "mixtral", WINDOWED, dict(sliding_window=WINDOW, num_local_experts=4)),
    Arch("qwen2-some-sliding", "qwen2", WINDOWED,
         dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    Arch("qwen2_moe", "qwen2_moe", overrides=MOE),
    Arch("qwen3", "qwen3", seed=1, init=1.0),
    Arch("qwen3_moe", "qwen3_moe", overrides=MOE, seed=1),
    Arch("gemma", "gemma"),
    Arch("gemma2", "gemma2", WINDOWED, dict(sliding_window=WINDOW), seed=1, init=0.02),
    Arch("gemma3_text", "gemma3_text", WINDOWED, dict(sliding_window=WINDOW), seed=2, init=0.02),
    Arch("phi", "phi"),
    Arch("phi3-4k-window", "phi3", WINDOWED, dict(sliding_window=WINDOW)),
    Arch("phi3-longrope", "phi3", LONGROPE,
         dict(original_max_position_embeddings=THRESHOLD, rope_scaling=LONGROPE_SCALING)),
    Arch("phimoe-longrope", "phimoe", LONGROPE,
         dict(original_max_position_embeddings=THRESHOLD, num_local_experts=4,
              rope_scaling={**LONGROPE_SCALING, "short_mscale": 1.0, "long_mscale": 1.2,
                            "original_max_position_embeddings": THRESHOLD})),
    Arch("gpt2", "gpt2", POSITIONED, dict(n_positions=POSITIONS), drop=NO_POSITIONS),
    Arch("gptj", "gptj", POSITIONED, dict(n_positions=POSITIONS, rotary_dim=4),
         drop=NO_POSITIONS),
    Arch("codegen", "codegen", POSITIONED, dict(n_positions=POSITIONS, rotary_dim=4),
         drop=NO_POSITIONS),
    Arch("gpt_neo-local", "gpt_neo", WINDOWED,
         dict(max_position_embeddings=POSITIONS * 2, window_size=WINDOW, num_layers=2,
              num_heads=4, attention_types=[[["global", "local"], 1]]),
         drop=("head_dim", "num_hidden_layers", "num_attention_heads")),
    Arch("gpt_neox", "gpt_neox"),
    Arch("falcon", "falcon", overrides=dict(new_decoder_architecture=True, num_kv_heads=2),
         drop=("head_dim", "num_key_value_heads"), seed=2, init=1.0),
    Arch("opt", "opt", POSITIONED,
         dict(max_position_embeddings=POSITIONS, ffn_dim=64, word_embed_proj_dim=32,
              init_std=0.3, activation_function="gelu"), drop=("head_dim",)),
    Arch("stablelm", "stablelm"),
    Arch("starcoder2", "starcoder2", WINDOWED, dict(sliding_window=WINDOW)),
    Arch("cohere", "cohere"),
    Arch("cohere2", "cohere2", WINDOWED, dict(sliding_window=WINDOW)),
    Arch("olmo", "olmo"),
    Arch("olmo2", "olmo2", seed=4, init=0.6),
    Arch("olmo3", "olmo3", WINDOWED, dict(sliding_window=WINDOW), seed=4, init=0.6),
    Arch("gpt_bigcode", "gpt_bigcode", POSITIONED, dict(n_positions=POSITIONS),
         drop=NO_POSITIONS),
    Arch("granite", "granite"),
    Arch("granitemoe", "granitemoe", overrides=dict(num_local_experts=4)),
    Arch("deepseek_v3", "deepseek_v3", overrides=DEEPSEEK, drop=("head_dim",)),
    Arch("deepseek_v2", "deepseek_v2", overrides=DEEPSEEK, drop=("head_dim",), seed=1, init=1.0),
    Arch("gpt_oss", "gpt_oss", WINDOWED,
         dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    Arch("helium", "helium"),
    Arch("glm4", "glm4"),
    Arch("nemotron", "nemotron"),
    Arch("persimmon", "persimmon"),
    Arch("biogpt", "biogpt", POSITIONED, dict(max_position_embeddings=POSITIONS),
         drop=("head_dim",), init=1.0),
    Arch("olmoe", "olmoe", overrides=dict(num_experts=4, num_experts_per_tok=2)),
    Arch("ministral", "ministral", WINDOWED, dict(sliding_window=WINDOW)),
    Arch("exaone4", "exaone4", WINDOWED, dict(sliding_window=WINDOW, sliding_window_pattern=2),
         seed=1, init=0.5),
    Arch("llama4_text-chunked", "llama4_text", CHUNKED,
         dict(attention_chunk_size=WINDOW, num_local_experts=2, intermediate_size_mlp=64,
              no_rope_layers=[1, 1])),
    Arch("smollm3", "smollm3"),
    Arch("seed_oss", "seed_oss"),
    Arch("ernie4_5", "ernie4_5"),
)  # fmt: skip
BY_NAME = {arch.name: arch for arch in ARCHITECTURES}


def arch_config(arch: Arch):
    kwargs = {k: v for k, v in COMMON.items() if k not in arch.drop}
    kwargs.update(arch.overrides)
    config = CONFIG_MAPPING[arch.model_type](**kwargs)
    config.initializer_range = arch.init
    return config


@functools.lru_cache(maxsize=None)
def arch_model(name: str, attn: str):
    """The architecture's tiny random model (cached: tests must not modify it), or None when it
    does not offer ``attn``."""
    arch = BY_NAME[name]
    config = arch_config(arch)
    torch.manual_seed(arch.seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError as exc:
        if "does not support" in str(exc):  # this architecture does not implement that attention
            return None
        raise
    model.generation_config.eos_token_id = None  # long outputs: the thresholds get crossed
    return model.eval()


def attentions(name: str) -> list[str]:
    """The attention implementations the architecture offers, among sdpa and eager."""
    return [attn for attn in ("sdpa", "eager") if arch_model(name, attn) is not None]


def reset_rope(model) -> None:
    """Put context-dependent rotary modules back in their freshly loaded state, so that the
    reference ``generate`` call starts where a freshly loaded model starts."""
    profile = profile_model(model)
    if profile.rope_kind is not None:
        restore_rope_state(profile, pristine_rope_state(profile))
