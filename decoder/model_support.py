"""Which models can be verified with tree attention, and loading one.

Tree verification needs three things from a model: attention that honours a 4D additive mask,
positions taken from ``position_ids``, and a KV cache whose positions can be dropped. Recurrent and
state-space layers carry a state that cannot be forked per branch, flash attention ignores 4D
masks, and sliding-window layers forget old keys by themselves; such models are refused here,
before they could produce wrong text. Whatever passes the static checks is then probed: a small
tree is verified and compared with plain sequential forward passes.
"""

from __future__ import annotations

from typing import Any

import torch

from decoder.draft_tree import DraftTree
from decoder.errors import UnsupportedModelError
from decoder.kv_cache import keep_accepted, new_cache
from decoder.verify import prefill, verify_tree

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
RECURRENT_MODEL_TYPES = frozenset(
    {
        "bamba", "falcon_h1", "falcon_mamba", "granitemoehybrid", "jamba", "lfm2", "mamba",
        "mamba2", "minimax", "nemotron_h", "qwen3_next", "recurrent_gemma", "rwkv", "xlstm",
        "zamba", "zamba2",
    }
)  # fmt: skip
# Attention implementations that drop or reject an arbitrary 4D float mask.
MASK_IGNORING_PREFIXES = ("flash", "paged", "flex")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True)


def check_model(model: torch.nn.Module) -> None:
    """Raise ``UnsupportedModelError`` unless tree verification is exact for ``model``."""
    check_architecture(model.config)
    probe_tree_attention(model)


def check_architecture(config: Any) -> None:
    """The static half of ``check_model``: what the config alone rules out."""
    name = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; the decoder verifies decoder-only causal LMs"
        )
    text = text_config(config)
    layer_types = getattr(text, "layer_types", None) or ()
    other_layers = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
    if text.model_type in RECURRENT_MODEL_TYPES or other_layers:
        raise UnsupportedModelError(
            f"{name} has recurrent or state-space layers {other_layers or ''}: their state cannot "
            "be forked per draft branch, so tree verification would give wrong text. Use plain "
            "generation (model.generate) for this model."
        )
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation.startswith(MASK_IGNORING_PREFIXES):
        raise UnsupportedModelError(
            f"attention implementation {implementation!r} ignores 4D tree masks; load the model "
            "with attn_implementation='sdpa' (or 'eager')"
        )


def attention_window(config: Any) -> int | None:
    """How many positions back sliding-window (or chunked) layers see; ``None``: all of them."""
    text = text_config(config)
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(text, "layer_types", None)
    windowed = {"sliding_attention", "chunked_attention"}
    if layer_types is not None and not windowed & set(layer_types):
        return None
    return int(window)


def check_length(config: Any, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a generation that would reach past a sliding window.

    The last emitted token is chosen from the logits at position
    ``prompt_len + max_new_tokens - 2``; while every such position is inside the window, windowed
    and full attention agree exactly.
    """
    window = attention_window(config)
    if window is not None and prompt_len + max_new_tokens > window:
        raise UnsupportedModelError(
            f"this model attends to only the last {window} positions in some layers, which tree "
            f"verification does not reproduce; prompt ({prompt_len} tokens) + max_new_tokens "
            f"({max_new_tokens}) must stay within {window}. Shorten the prompt or the generation."
        )


@torch.inference_mode()
def probe_tree_attention(model: torch.nn.Module) -> None:
    """Verify a two-branch tree and compare it with sequential forward passes.

    A model that ignores the 4D mask lets one sibling see the other; one that ignores
    ``position_ids`` puts the second sibling one position too far; a cache that cannot be
    trimmed breaks the step after. Each shows up as logits that differ from the reference.
    """
    vocab = model.get_input_embeddings().num_embeddings
    a, b, root, left, right, after = [(i + 1) % vocab for i in range(6)]
    try:
        reference = [
            sequential_logits(model, [a, b, root]),
            sequential_logits(model, [a, b, root, left]),
            sequential_logits(model, [a, b, root, right]),
            sequential_logits(model, [a, b, root, right, after]),
        ]
        cache = new_cache()
        prefill(model, cache, [a, b])
        tree = DraftTree([left, right], [-1, -1], [1.0, 1.0])
        logits = verify_tree(model, cache, tree.linearise(root, 2, model.dtype, model.device))
        keep_accepted(cache, 2, [0, 2])  # root, then the right branch
        step = DraftTree.empty().linearise(after, 4, model.dtype, model.device)
        tested = [logits[0], logits[1], logits[2], verify_tree(model, cache, step)[0]]
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} failed a tree-attention forward pass ({exc!r}); it needs a 4D "
            "attention mask, position_ids and a DynamicCache"
        ) from exc
    tolerance = 1e-4 if model.dtype in (torch.float32, torch.float64) else 2e-2
    for got, want in zip(tested, reference):
        if (got - want).abs().max().item() > tolerance * (1.0 + want.abs().max().item()):
            raise UnsupportedModelError(
                f"{type(model).__name__} with attention {model.config._attn_implementation!r} "
                "gives different logits under a tree mask than sequentially (it ignores the 4D "
                "mask or position_ids); load it with attn_implementation='sdpa' or 'eager'"
            )


def sequential_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits after ``ids`` from one ordinary causal forward pass: [vocab], float32."""
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    return out.logits[0, -1].float()


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[torch.nn.Module, Any]:
    """A causal LM (in eval mode, on ``device``) and its tokenizer, from a directory or a hub id."""
    from transformers import AutoModelForCausalLM

    from rest.tokenizer import load_tokenizer

    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval(), load_tokenizer(name_or_path)
