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

The settings are the call's, resolved by transformers itself (the model's generation config merged
with the call's arguments): greedy or sampling with every logits processor ``RestGenerator``
applies (temperature, top-k, top-p, min-p, typical-p, repetition penalty, ``min_new_tokens``...),
EOS tokens, ``max_length``/``max_new_tokens``. What the REST loop would not reproduce (beam search,
a ``logits_processor`` or ``stopping_criteria`` of the caller's, ``max_time``...) is refused with a
``ValueError`` that names it, before anything is decoded: never a silent difference. Greedy
output is token-identical to plain ``generate``; sampled output follows the same distribution,
drawn from a seed taken from torch's global generator (so ``torch.manual_seed`` makes it
repeatable), not the same draws. One sequence per call (batch size 1); transformers does not
pass ``streamer`` to custom loops.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from decoder.config import DecodingConfig
from decoder.generator import GenerationResult, RestGenerator
from decoder.settings import refuse_unverifiable, resolve_settings

# The stopping rules the REST loop applies itself (from the same generation config).
REPRODUCED_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, StopStringCriteria)


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
        refuse_unverifiable(generation_config)  # before the batch check: beams widen the batch
        if any(getattr(generation_config, f"output_{name}") for name in ("scores", "logits", "attentions",
                                                                          "hidden_states")):  # fmt: skip
            raise ValueError("RestDecoding returns sequences only: leave output_scores, output_logits, "
                             "output_attentions and output_hidden_states unset")
        prompt = prompt_ids(input_ids, model_kwargs.get("attention_mask"))
        max_new_tokens = generation_config.max_length - input_ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(
                f"max_length ({generation_config.max_length}) leaves no room after the prompt "
                f"({input_ids.shape[1]} tokens): pass max_new_tokens"
            )
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        check_same_rules(model, prompt, generation_config, options, logits_processor, stopping_criteria)
        if generation_config.do_sample:
            options["seed"] = int(torch.randint(0, 2**62, (1,)).item())  # the global generator's draw
        result = self.generator(model).generate(prompt, generation_config, **options)
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


def check_same_rules(
    model: torch.nn.Module,
    prompt: list[int],
    generation_config: Any,
    options: dict[str, Any],
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
) -> None:
    """Refuse, naming them, the processors and stopping rules transformers prepared for this call
    that the REST loop, resolving the same generation config, would not apply: the caller's own
    ``logits_processor``/``stopping_criteria``, and rules such as ``max_time``."""
    ours = Counter(type(p) for p in resolve_settings(model, prompt, generation_config, options).processors)
    theirs = Counter(type(p) for p in logits_processor)
    others = sorted(cls.__name__ for cls in (theirs - ours))
    others += sorted(type(c).__name__ for c in stopping_criteria if not isinstance(c, REPRODUCED_CRITERIA))
    if others:
        raise ValueError(
            f"RestDecoding does not apply {', '.join(others)}: leave out the logits processors and "
            "stopping criteria of your own and max_time, or use plain generate"
        )
