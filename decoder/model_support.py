"""Which models can be verified with tree attention, what each needs, and loading one.

Tree verification needs three things from a model: attention that honours a 4D additive mask,
positions taken from ``position_ids``, and a KV cache whose entries can be dropped. Recurrent and
state-space layers carry a state that cannot be forked per branch, and flash attention ignores 4D
masks: such models are refused here, before they could produce wrong text. For the others,
``profile_model`` records, once, what the decoder must do so that every verified tree computes
what plain decoding computes (a ``ModelProfile``):

- attention patterns: every layer type gets its own mask, built by position. Full attention sees
  every earlier position; a sliding window (Mistral, Gemma 2/3, gpt-oss, Phi-3, Qwen2 with some
  sliding layers, GPT-Neo's local layers) the last ``window`` positions, itself included; a chunk
  (Llama 4) its own block. Models with several layer types take a dict of masks, one per type
  (their ``causal_mask_mapping``); GPT-Neo, whose local layers apply an index-based table of their
  own, gets its masks per layer through forward pre-hooks while that table is set aside.
- a finite position table (learned absolute positions: GPT-2, OPT, GPT-Neo, BigCode; GPT-J's
  fixed sinusoid table): no tree may reach past it, and a request whose plain decoding would
  (prompt + max_new_tokens - 1 positions) is refused before it starts.
- RoPE whose frequencies depend on the context: dynamic NTK recomputes them from
  ``max(position_ids)`` (tree positions must never raise it above what plain decoding would feed:
  trees are cut short, down to plain steps past the threshold, and each sequence keeps its own
  rotary state in a batch); longrope switches from short to long factors once a forward pass
  reaches ``original_max_position_embeddings`` (by position, or by cache index in PhiMoE: trees
  never straddle the switch, and a model whose own input preparation rebuilds the cache at the
  crossing, Phi-3's and PhiMoE's, gets the same rebuild, run by its own code).

Whatever passes the static checks is then probed: small trees of two rows of different lengths
are verified in one batch and compared with plain sequential forward passes.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers.generation.utils import GenerationMixin

from decoder.errors import UnsupportedModelError

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
# Names of learned absolute position tables (nn.Embedding) in transformers' models.
POSITION_TABLE_NAMES = frozenset({"wpe", "embed_positions", "position_embeddings"})


@dataclass(frozen=True)
class AttentionPattern:
    """What a layer attends to, by position: every earlier position (both None), the last
    ``window`` positions, itself included, or the positions of its own ``chunk``-sized block."""

    window: int | None = None
    chunk: int | None = None


@dataclass(frozen=True, eq=False)
class ModelProfile:
    """What tree verification must do for one model (see the module docstring).

    ``masks``: pattern key -> pattern; the key ``None`` means one mask for every layer, other keys
    are layer types (the model takes a dict) or, with ``hooked_layers``, the key each hooked
    attention module gets. ``causal_tables``: modules whose index-based causal ``bias`` table is
    set aside during tree steps (the tree masks carry causality, by position).
    ``position_limit``: size of the model's position table. ``rope_kind``: ``"dynamic"``,
    ``"longrope"`` or None, with its ``rope_modules`` and ``rope_threshold`` (the original
    maximum position count); ``rope_by_cache_index``: the frequencies are chosen from the
    largest cache index of a pass rather than the largest position (PhiMoE), so the tree's size
    counts, not its depth. ``rebuilds_cache``: the model's input preparation drops the cache
    when the context crosses the threshold.
    """

    masks: Mapping[str | None, AttentionPattern]
    hooked_layers: tuple[tuple[torch.nn.Module, str], ...] = ()
    causal_tables: tuple[torch.nn.Module, ...] = ()
    position_limit: int | None = None
    rope_kind: str | None = None
    rope_modules: tuple[torch.nn.Module, ...] = ()
    rope_threshold: int | None = None
    rope_by_cache_index: bool = False
    rebuilds_cache: bool = False
    name: str = field(default="model")

    @property
    def shares_rope_state(self) -> bool:
        """Rows of one forward pass share the rotary frequencies, chosen from the largest
        position among them: with context-dependent RoPE, only rows that would choose the same
        may share a pass."""
        return self.rope_kind is not None


def text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True)


def check_model(model: torch.nn.Module) -> ModelProfile:
    """The model's ``ModelProfile``; raises ``UnsupportedModelError`` unless tree verification
    is exact for it."""
    profile = profile_model(model)
    probe_tree_attention(model, profile)
    return profile


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


def profile_model(model: torch.nn.Module) -> ModelProfile:
    """What the config and the modules say (no forward pass)."""
    check_architecture(model.config)
    text = text_config(model.config)
    masks, hooked = attention_patterns(model, text)
    rope_kind, rope_modules, threshold, by_cache_index = rope_scheme(model, text)
    overrides = type(model).prepare_inputs_for_generation is not (
        GenerationMixin.prepare_inputs_for_generation
    )
    causal_tables = tuple(
        m for m in model.modules()
        if isinstance(getattr(m, "bias", None), torch.Tensor) and m.bias.dtype == torch.bool
        and m.bias.ndim == 4
    )  # fmt: skip
    return ModelProfile(
        masks=masks,
        hooked_layers=hooked,
        causal_tables=causal_tables,
        position_limit=position_table_size(model),
        rope_kind=rope_kind,
        rope_modules=rope_modules,
        rope_threshold=threshold,
        rope_by_cache_index=by_cache_index,
        rebuilds_cache=rope_kind == "longrope" and overrides,
        name=type(model).__name__,
    )


def rope_scheme(
    model: torch.nn.Module, text: Any
) -> tuple[str | None, tuple[torch.nn.Module, ...], int | None, bool]:
    """(kind, rotary modules, threshold, by cache index) of context-dependent RoPE, or
    ``(None, (), None, False)``."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "rope_type", None), str)]
    for kind in ("dynamic", "longrope"):
        mine = tuple(m for m in modules if kind in m.rope_type)
        if not mine:
            continue
        by_cache_index = not hasattr(mine[0], "original_max_seq_len")
        if kind == "dynamic":
            if by_cache_index:
                raise UnsupportedModelError(
                    f"{type(model).__name__} recomputes dynamic RoPE from cache positions in a "
                    "way the decoder does not reproduce; use model.generate"
                )
            return kind, mine, int(mine[0].original_max_seq_len), False
        # Where longrope switches to its long factors, as transformers decides it.
        scaling = getattr(text, "rope_scaling", None) or {}
        threshold = (getattr(text, "original_max_position_embeddings", None)
                     or scaling.get("original_max_position_embeddings")
                     or text.max_position_embeddings)  # fmt: skip
        return kind, (() if by_cache_index else mine), int(threshold), by_cache_index
    return None, (), None, False


def attention_patterns(
    model: torch.nn.Module, text: Any
) -> tuple[dict[str | None, AttentionPattern], tuple[tuple[torch.nn.Module, str], ...]]:
    """(masks, hooked layers) of ``ModelProfile`` for this model."""
    if getattr(text, "model_type", None) == "gpt_neo":
        # GPT-Neo's local layers: a window of ``window_size`` positions, itself included (its
        # table keeps ``0 <= q - k < window_size``), applied by index; per-layer masks by hooks.
        patterns = {"global": AttentionPattern(), "local": AttentionPattern(window=text.window_size)}
        layers = tuple((block.attn, block.attn.attention_type) for block in model.transformer.h)
        return patterns, layers
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    chunk = getattr(text, "attention_chunk_size", None)
    by_type = {
        "full_attention": AttentionPattern(),
        "sliding_attention": AttentionPattern(window=window),
        "chunked_attention": AttentionPattern(chunk=chunk),
    }
    if layer_types:
        kinds = {t: by_type[t] for t in dict.fromkeys(layer_types)}
        if len(kinds) == 1:
            return {None: next(iter(kinds.values()))}, ()
        return kinds, ()  # these models take one mask per layer type (a dict)
    if window and getattr(text, "use_sliding_window", True) is not False:
        return {None: AttentionPattern(window=int(window))}, ()  # every layer (Mistral, Phi-3)
    return {None: AttentionPattern()}, ()


def attention_window(config: Any) -> int | None:
    """How many positions back the narrowest sliding window sees; ``None``: no window."""
    text = text_config(config)
    if getattr(text, "model_type", None) == "gpt_neo":
        return int(text.window_size) if "local" in text.attention_layers else None
    layer_types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def position_table_size(model: torch.nn.Module) -> int | None:
    """How many positions the model's position table holds (None: RoPE or ALiBi, no table)."""
    sizes = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLE_NAMES:
            sizes.append(module.num_embeddings - int(getattr(module, "offset", 0)))
    n_positions = getattr(text_config(model.config), "n_positions", None)
    if n_positions:  # GPT-2, GPT-J, CodeGen, BigCode: tables of n_positions rows
        sizes.append(int(n_positions))
    return min(sizes) if sizes else None


def check_request(profile: ModelProfile, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse a request that plain decoding could not run to its end: the last token is chosen
    after feeding position ``prompt_len + max_new_tokens - 2``."""
    limit = profile.position_limit
    if limit is not None and prompt_len + max_new_tokens - 1 > limit:
        raise ValueError(
            f"{profile.name} has {limit} positions: prompt ({prompt_len} tokens) + "
            f"max_new_tokens ({max_new_tokens}) - 1 must stay within them. Shorten the prompt "
            f"or ask for at most {max(limit - prompt_len + 1, 0)} new tokens."
        )


# --- context-dependent RoPE ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RopeState:
    """The mutable part of rotary modules (dynamic NTK): per module, (inv_freq,
    max_seq_len_cached, attention_scaling)."""

    values: tuple[tuple[torch.Tensor, int, float], ...]

    @property
    def seen(self) -> int:
        """``max_seq_len_cached``: dynamic frequencies are recomputed above it."""
        return int(self.values[0][1]) if self.values else 0

    def key(self) -> tuple:
        return tuple((id(f), int(n), float(s)) for f, n, s in self.values)


def pristine_rope_state(profile: ModelProfile) -> RopeState:
    """The state of freshly loaded rotary modules: original frequencies, nothing seen beyond
    the original maximum."""
    return RopeState(tuple((m.original_inv_freq, int(m.original_max_seq_len), 1.0)
                           for m in profile.rope_modules))  # fmt: skip


def save_rope_state(profile: ModelProfile) -> RopeState:
    return RopeState(tuple((m.inv_freq, int(m.max_seq_len_cached), m.attention_scaling)
                           for m in profile.rope_modules))  # fmt: skip


def restore_rope_state(profile: ModelProfile, state: RopeState) -> None:
    for module, (inv_freq, seen, scaling) in zip(profile.rope_modules, state.values):
        module.register_buffer("inv_freq", inv_freq.to(module.original_inv_freq.device),
                               persistent=False)  # fmt: skip
        module.max_seq_len_cached = seen
        module.attention_scaling = scaling


def tree_limits(
    profile: ModelProfile, prefix_len: int, tokens_left: int, rope: RopeState | None = None
) -> tuple[int, int | None]:
    """(deepest draft node, most draft nodes) a step after ``prefix_len`` cached entries may
    verify so that it computes what plain decoding computes (None: no limit on nodes). The root
    is at position ``prefix_len``; plain decoding would feed it alone (``max(position_ids) + 1
    == prefix_len + 1``)."""
    depth = max(tokens_left - 1, 0)  # deeper nodes could never be emitted
    nodes = None
    seq_len = prefix_len + 1
    if profile.position_limit is not None:
        depth = min(depth, profile.position_limit - 1 - prefix_len)
    if profile.rope_kind == "longrope" and seq_len <= profile.rope_threshold:
        room = profile.rope_threshold - seq_len  # stay on the short factors
        if profile.rope_by_cache_index:
            nodes = room  # the pass's last cache index decides, and every node takes one
        depth = min(depth, room)
    if profile.rope_kind == "dynamic":
        assert rope is not None
        seen, original = rope.seen, profile.rope_threshold
        if seq_len > seen:
            return 0, 0  # plain decoding recomputes the frequencies at every step from here
        depth = min(depth, seen - seq_len)
        if seen > original and seq_len < original:
            depth = min(depth, original - 1 - seq_len)  # plain decoding resets them here
    return max(depth, 0), nodes


def rebuild_inputs(
    model: torch.nn.Module, profile: ModelProfile, context: list[int], cache: Any
) -> dict | None:
    """The inputs of ``generate``'s next forward pass when the model's own input preparation
    drops the cache (Phi-3 and PhiMoE longrope, at the crossing of
    ``original_max_position_embeddings``), else None. Asked of the model itself, with the
    arguments ``generate`` passes, so that the rebuild is the model's own (its eager attention,
    for one, then runs without a causal mask, and the rebuilt cache with it)."""
    prefix_len = len(context) - 1
    if not profile.rebuilds_cache or prefix_len != profile.rope_threshold:
        return None
    device = model.device
    extra = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    inputs = model.prepare_inputs_for_generation(
        torch.tensor([context], device=device),
        past_key_values=cache,
        attention_mask=torch.ones((1, len(context)), dtype=torch.long, device=device),
        cache_position=torch.tensor([prefix_len], device=device),
        use_cache=True,
        **extra,
    )
    return inputs if inputs.get("past_key_values") is None else None


# --- tree forward passes --------------------------------------------------------------------------

_ALL_VISIBLE_SIZE = 1 << 24


@contextmanager
def tree_attention(profile: ModelProfile, masks: Mapping[str | None, torch.Tensor]) -> Iterator[None]:
    """During one tree forward pass: index-based causal tables see everything (the tree masks
    decide), and hooked layers get their own masks."""
    saved = [(module, module.bias) for module in profile.causal_tables]
    handles = []
    try:
        for module, table in saved:
            # A stride-0 view: any size, no memory; sliced like the table it stands for.
            module.bias = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=table.device).expand(
                1, 1, _ALL_VISIBLE_SIZE, _ALL_VISIBLE_SIZE
            )
        for module, key in profile.hooked_layers:
            hook = partial(_replace_mask, masks[key])
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, table in saved:
            module.bias = table


def _replace_mask(mask: torch.Tensor, module, args, kwargs):
    kwargs["attention_mask"] = mask
    return args, kwargs


@torch.inference_mode()
def probe_tree_attention(model: torch.nn.Module, profile: ModelProfile) -> None:
    """Verify trees for two rows of different lengths in one batch and compare them with
    sequential forward passes.

    A model that ignores the 4D mask lets one sibling see the other; one that ignores
    ``position_ids`` puts the second sibling one position too far; a cache that cannot be
    trimmed breaks the step after; padding that leaks shows up in the shorter row. Each shows
    up as logits that differ from the reference.
    """
    from decoder.kv_cache import BatchedCache
    from decoder.verify import RowTree, build_tree_batch, forward_tree_batch, prefill

    vocab = model.get_input_embeddings().num_embeddings
    t = [(i + 1) % vocab for i in range(12)]
    prompts = [[t[0], t[1]], [t[2], t[3], t[4], t[5]]]
    trees = [RowTree(t[6], [t[7], t[8]], [-1, -1]), RowTree(t[9], [t[10], t[11]], [-1, 0])]
    paths = [[[], [t[7]], [t[8]]], [[], [t[10]], [t[10], t[11]]]]
    try:
        reference = [[sequential_logits(model, p + [tree.root] + path) for path in row_paths]
                     for p, tree, row_paths in zip(prompts, trees, paths)]  # fmt: skip
        kv = BatchedCache()
        for prompt in prompts:
            kv.append(prefill(model, prompt)[0], len(prompt))
        width = kv.width
        batch = build_tree_batch(trees, kv.lengths, width, profile, model.dtype, model.device)
        logits = forward_tree_batch(model, profile, kv, batch).float()
        kv.commit(width, [[0, 2], [0, 1, 2]])  # row 0: the second branch; row 1: the chain
        after = [RowTree(t[3], [], []), RowTree(t[4], [], [])]
        batch = build_tree_batch(after, kv.lengths, kv.width, profile, model.dtype, model.device)
        later = forward_tree_batch(model, profile, kv, batch).float()
        tested = [[logits[0, 0], logits[0, 1], logits[0, 2], later[0, 0]],
                  [logits[1, 0], logits[1, 1], logits[1, 2], later[1, 0]]]  # fmt: skip
        reference[0].append(sequential_logits(model, prompts[0] + [t[6], t[8], t[3]]))
        reference[1].append(sequential_logits(model, prompts[1] + [t[9], t[10], t[11], t[4]]))
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"{type(model).__name__} failed a tree-attention forward pass ({exc!r}); it needs a 4D "
            "attention mask, position_ids and a DynamicCache"
        ) from exc
    tolerance = 1e-4 if model.dtype in (torch.float32, torch.float64) else 3e-2
    for got_row, want_row in zip(tested, reference):
        for got, want in zip(got_row, want_row):
            if (got - want).abs().max().item() > tolerance * (1.0 + want.abs().max().item()):
                raise UnsupportedModelError(
                    f"{type(model).__name__} with attention "
                    f"{model.config._attn_implementation!r} gives different logits under a tree "
                    "mask than sequentially (it ignores the 4D mask or position_ids); load it "
                    "with attn_implementation='sdpa' or 'eager', or use model.generate"
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
