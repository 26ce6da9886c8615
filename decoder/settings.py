"""Generation settings as ``model.generate`` resolves them, for one sequence.

Exactness is defined by Hugging Face's ``generate`` with the model's own generation config, so the
settings are resolved by the same code: ``GenerationMixin._prepare_generation_config`` merges the
call's options into ``model.generation_config`` (a model that ships ``repetition_penalty=1.05``
gets it, sampling defaults such as ``top_k=50`` apply), ``_prepare_special_tokens`` settles the
EOS ids (the generation config's: ``None`` there means none, whatever ``model.config`` says), and
``_get_logits_processor`` builds the very processors ``generate`` would apply. The decoder then
feeds each tree node its own token history (context plus the path to the node), so a processor
sees exactly what it would see in plain decoding.

Two rules are REST's own, for the callers of its older API and of OpenAI-style servers: a
``temperature`` above 0 samples unless ``do_sample`` is given, and ``temperature=0`` is greedy.
``max_new_tokens`` comes from the call, else from the model's generation config, else 128 (Hugging
Face's model-agnostic ``max_length=20`` default counts the prompt, which no caller wants).

What cannot be verified as a tree is refused here, before generation starts: beam search, contrastive
search, DoLa, classifier-free guidance, and any logits processor that is not a pure function of
the token history.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation.configuration_utils import GenerationMode

from decoder.errors import DecoderError

DEFAULT_MAX_NEW_TOKENS = 128

# Processors whose output depends only on (token history, scores), row by row: feeding a tree node
# its own history gives exactly what plain decoding computes at that point.
PURE_PROCESSORS = (
    lp.SequenceBiasLogitsProcessor,
    lp.EncoderRepetitionPenaltyLogitsProcessor,
    lp.RepetitionPenaltyLogitsProcessor,
    lp.NoRepeatNGramLogitsProcessor,
    lp.EncoderNoRepeatNGramLogitsProcessor,
    lp.NoBadWordsLogitsProcessor,
    lp.MinLengthLogitsProcessor,
    lp.MinNewTokensLengthLogitsProcessor,
    lp.ForcedBOSTokenLogitsProcessor,
    lp.ForcedEOSTokenLogitsProcessor,
    lp.InfNanRemoveLogitsProcessor,
    lp.ExponentialDecayLengthPenalty,
    lp.SuppressTokensLogitsProcessor,
    lp.SuppressTokensAtBeginLogitsProcessor,
    lp.TemperatureLogitsWarper,
    lp.TopKLogitsWarper,
    lp.TopPLogitsWarper,
    lp.MinPLogitsWarper,
    lp.TypicalLogitsWarper,
    lp.EpsilonLogitsWarper,
    lp.EtaLogitsWarper,
    lp.WatermarkLogitsProcessor,
    lp.LogitNormalization,
)
VERIFIABLE_MODES = (
    GenerationMode.GREEDY_SEARCH,
    GenerationMode.SAMPLE,
    GenerationMode.ASSISTED_GENERATION,  # prompt lookup: its output is greedy's or sampling's
)


class UnsupportedGenerationError(DecoderError, ValueError):
    """A generation option that tree verification cannot reproduce (beam search, guidance...)."""


@dataclass(frozen=True, eq=False)
class GenerationSettings:
    """One sequence's resolved settings.

    ``config``: the generation config ``generate`` would use for this prompt (``max_length`` set).
    ``processors``: transformers' own logits processors for it (empty: raw logits are used).
    ``greedy``: argmax of the processed scores, else one draw from their softmax.
    ``eos_ids``: the tokens that end the output (kept in it). ``stop_strings``: from the config and
    the call. ``seed``: an int, a CPU ``torch.Generator`` (advanced by the draws), or None.
    """

    config: GenerationConfig
    processors: lp.LogitsProcessorList
    greedy: bool
    max_new_tokens: int
    eos_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    seed: int | torch.Generator | None

    def generator(self) -> torch.Generator | None:
        """The random generator of this sequence's draws (None when greedy)."""
        if isinstance(self.seed, torch.Generator):
            return self.seed
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(self.seed))
        return generator


def resolve_settings(
    model: Any,
    prompt_ids: Sequence[int],
    generation_config: GenerationConfig | None = None,
    options: Mapping[str, Any] | None = None,
    stop_strings: Sequence[str] = (),
) -> GenerationSettings:
    """The settings of ``model.generate(prompt_ids, generation_config, **options)``.

    ``options`` are ``GenerationConfig`` attributes, plus ``seed``. Raises ``ValueError`` for an
    invalid value and ``UnsupportedGenerationError`` for what tree verification cannot reproduce.
    """
    options = dict(options or {})
    seed = options.pop("seed", None)
    if seed is not None and not isinstance(seed, (int, torch.Generator)):
        raise ValueError(f"seed must be an int or a torch.Generator, got {seed!r}")
    temperature = options.get("temperature")
    if temperature is not None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature == 0:
            options.pop("temperature")
            options["do_sample"] = False
        else:
            options.setdefault("do_sample", True)
    if options.get("max_new_tokens") is not None and options["max_new_tokens"] < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {options['max_new_tokens']}")
    for name, low, high in (("top_p", 0.0, 1.0), ("typical_p", 0.0, 1.0), ("min_p", 0.0, 1.0)):
        value = options.get(name)
        if value is not None and not low < value <= high:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if options.get("top_k") is not None and options["top_k"] < 0:
        raise ValueError(f"top_k must be >= 0, got {options['top_k']}")
    if options.get("repetition_penalty") is not None and options["repetition_penalty"] <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {options['repetition_penalty']}")

    explicit_max_length = options.get("max_length") is not None
    try:
        config, unknown = model._prepare_generation_config(
            copy.deepcopy(generation_config), None, **options
        )
    except ValueError:
        raise
    except Exception as exc:  # transformers validates by raising assorted types
        raise ValueError(f"invalid generation options: {exc}") from exc
    if unknown:
        raise ValueError(
            f"unknown generation option(s) {sorted(unknown)}: pass GenerationConfig attributes "
            "(max_new_tokens, do_sample, temperature, top_p, top_k, min_p, typical_p, "
            "repetition_penalty, ...) or seed"
        )
    refuse_unverifiable(config)

    prompt_len = len(prompt_ids)
    if config.max_new_tokens is None:
        if explicit_max_length:
            config.max_new_tokens = config.max_length - prompt_len
            if config.max_new_tokens < 1:
                raise ValueError(
                    f"max_length ({config.max_length}) leaves no room after the prompt "
                    f"({prompt_len} tokens); raise it or set max_new_tokens"
                )
        else:
            config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    config.max_length = prompt_len + config.max_new_tokens
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + prompt_len

    device = model.device
    model._prepare_special_tokens(config, True, device=device)
    prompt = torch.tensor([list(prompt_ids)], device=device)  # [1, prompt]
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_len,
        encoder_input_ids=prompt,
        prefix_allowed_tokens_fn=None,
        logits_processor=lp.LogitsProcessorList(),
        device=device,
        model_kwargs={},
    )
    for processor in processors:
        if not isinstance(processor, PURE_PROCESSORS):
            raise UnsupportedGenerationError(
                f"the logits processor {type(processor).__name__} is not a function of the token "
                "history alone, so tree verification cannot reproduce it; use model.generate"
            )
    eos = config._eos_token_tensor
    eos_ids = frozenset(eos.tolist()) if eos is not None else frozenset()
    strings = list(stop_strings)
    if config.stop_strings is not None:
        own = [config.stop_strings] if isinstance(config.stop_strings, str) else config.stop_strings
        strings = [*own, *strings]
    if any(not s for s in strings):
        raise ValueError("stop strings must not be empty")
    return GenerationSettings(
        config=config,
        processors=processors,
        greedy=not config.do_sample,
        max_new_tokens=int(config.max_new_tokens),
        eos_ids=eos_ids,
        stop_strings=tuple(dict.fromkeys(strings)),
        seed=seed,
    )


def refuse_unverifiable(config: GenerationConfig) -> None:
    """Raise ``UnsupportedGenerationError`` for a generation mode other than greedy or sampling."""
    mode = config.get_generation_mode()
    if mode not in VERIFIABLE_MODES:
        raise UnsupportedGenerationError(
            f"generation mode {mode.value} (num_beams={config.num_beams}, penalty_alpha="
            f"{config.penalty_alpha}) cannot be verified as a draft tree: only greedy decoding and "
            "sampling can. Use model.generate for it."
        )
    if config.num_return_sequences not in (None, 1):
        raise UnsupportedGenerationError(
            "num_return_sequences > 1 is not supported: make one call per sequence"
        )
    if config.dola_layers is not None:
        raise UnsupportedGenerationError("DoLa decoding cannot be verified as a draft tree")
    if config.guidance_scale is not None and config.guidance_scale != 1:
        raise UnsupportedGenerationError(
            "classifier-free guidance runs a second model pass per token; it cannot be verified "
            "as a draft tree"
        )
