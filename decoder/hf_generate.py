"""REST drafts inside ``model.generate(...)``, through transformers' own hook for custom decoding.

``generate(custom_generate=callable)`` (transformers >= 4.56) prepares everything as usual (the
generation config merged from the model's and the call's arguments, logits processors, stopping
criteria) and then hands the decoding loop to the callable. ``RestDecoding`` is such a callable:
the loop it runs is the ``RestGenerator``'s (draft trees from a retriever and the context,
verified in one forward pass each), so the output is what the plain loop would have produced::

    from decoder.hf_generate import RestDecoding
    from rest.retriever import LocalRetriever

    rest = RestDecoding(LocalRetriever("ds/stack"), tokenizer)
    out = model.generate(**tokenizer("def quicksort(arr):", return_tensors="pt"),
                         max_new_tokens=256, custom_generate=rest)
    print(tokenizer.decode(out[0]), rest.last_result.stats.mean_accepted)

What it takes from the call: ``max_length``/``max_new_tokens``, ``do_sample``, ``temperature``,
``top_k``, ``top_p`` and the EOS tokens. A setting whose processor or stopping rule the loop does
not reproduce (repetition penalty, ``min_new_tokens``, beams...) is refused with a ``ValueError``
that names it, before anything is decoded: never a silent difference. Greedy output is
token-identical to plain ``generate``; sampled output follows the same distribution, drawn from a
seed taken from torch's global generator (so ``torch.manual_seed`` makes it repeatable), not the
same draws. One sequence per call (batch size 1); ``streamer`` is not passed to custom loops by
transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList

from decoder.config import DecodingConfig
from decoder.generator import GenerationResult, RestGenerator

# The processors and stopping rules the REST loop applies itself, exactly as transformers does.
REPRODUCED_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
REPRODUCED_CRITERIA = (MaxLengthCriteria, EosTokenCriteria)


class RestDecoding:
    """A ``custom_generate`` callable for ``model.generate``: decodes with REST drafts from
    ``retriever`` (None: drafts from the context only). ``tokenizer``: the model's (the datastore
    must have been built with one that behaves the same). The generator behind it is kept from
    call to call, with its calibration and the outputs it served (a draft source).
    ``last_result``: the last call's ``GenerationResult`` (tokens, statistics)."""

    def __init__(self, retriever: Any = None, tokenizer: Any = None, config: DecodingConfig = DecodingConfig()) -> None:
        if retriever is not None and tokenizer is None:
            raise ValueError("RestDecoding needs the model's tokenizer to check the datastore's against it")
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.config = config
        self.last_result: GenerationResult | None = None
        self._generator: RestGenerator | None = None

    def generator(self, model: torch.nn.Module) -> RestGenerator:
        if self._generator is None or self._generator.model is not model:
            self._generator = RestGenerator(model, self.tokenizer, self.retriever, self.config)
        return self._generator

    def __call__(
        self,
        model: torch.nn.Module,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: Any,
        **model_kwargs: Any,
    ) -> Any:
        # input_ids: [batch, prompt_len]
        check_settings(model, generation_config, logits_processor, stopping_criteria)
        prompt = prompt_ids(input_ids, model_kwargs.get("attention_mask"))
        max_new_tokens = generation_config.max_length - input_ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(
                f"max_length ({generation_config.max_length}) leaves no room after the prompt "
                f"({input_ids.shape[1]} tokens): pass max_new_tokens"
            )
        sampling: dict[str, Any] = {"temperature": 0.0}
        if generation_config.do_sample:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # from the global generator, as HF draws
            sampling = {
                "temperature": generation_config.temperature if generation_config.temperature is not None else 1.0,
                "top_k": generation_config.top_k or 0,
                "top_p": generation_config.top_p if generation_config.top_p is not None else 1.0,
                "seed": seed,
            }
        result = self.generator(model).generate(prompt, max_new_tokens, **sampling)
        self.last_result = result
        # sequences: [1, prompt_len + new_tokens], the prompt as given (padding included)
        new = torch.tensor([result.tokens], dtype=input_ids.dtype, device=input_ids.device)
        sequences = torch.cat([input_ids, new], dim=1)
        if generation_config.return_dict_in_generate:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences


def prompt_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """The one prompt of the batch, without left padding."""
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"RestDecoding decodes one sequence per call, got a batch of {input_ids.shape[0]}: "
            "call generate once per prompt"
        )
    ids = input_ids[0]
    if attention_mask is not None:
        mask = attention_mask[0].bool()
        if not bool(mask.all()):
            first = int(mask.nonzero()[0])
            if not bool(mask[first:].all()):
                raise ValueError("RestDecoding takes a left-padded prompt only (holes in attention_mask)")
            ids = ids[first:]
    return [int(i) for i in ids]


def eos_token_ids(model: torch.nn.Module) -> frozenset[int]:
    """The EOS ids of the model's own generation config (``generate``'s; None there is none)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)


def check_settings(
    model: torch.nn.Module,
    generation_config: Any,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
) -> None:
    """Refuse, naming it, every setting the REST loop would not reproduce exactly."""
    if generation_config.num_beams > 1 or generation_config.num_return_sequences > 1:
        raise ValueError("RestDecoding does not do beam search or several sequences per prompt: "
                         "num_beams and num_return_sequences must be 1")
    if generation_config.output_scores or generation_config.output_logits or generation_config.output_attentions \
            or generation_config.output_hidden_states:
        raise ValueError("RestDecoding returns sequences only: leave output_scores, output_logits, "
                         "output_attentions and output_hidden_states unset")
    others = [type(p).__name__ for p in logits_processor if not isinstance(p, REPRODUCED_PROCESSORS)]
    others += [type(c).__name__ for c in stopping_criteria if not isinstance(c, REPRODUCED_CRITERIA)]
    if others:
        raise ValueError(
            f"RestDecoding does not apply {', '.join(others)}: leave the settings that make them "
            "(repetition_penalty, min_new_tokens, stop_strings, max_time...) unset, or use plain generate"
        )
    eos = generation_config.eos_token_id
    wanted = frozenset() if eos is None else frozenset([eos] if isinstance(eos, int) else eos)
    if wanted != eos_token_ids(model):
        raise ValueError(
            f"RestDecoding stops at the model's own EOS tokens {sorted(eos_token_ids(model))}, "
            f"not {sorted(wanted)}: leave eos_token_id unset"
        )
