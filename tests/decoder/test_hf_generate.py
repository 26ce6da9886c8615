"""decoder/hf_generate.py: REST inside ``model.generate(custom_generate=...)``, identical to plain
``generate``."""

from __future__ import annotations

import pytest
import torch

from decoder.config import DecodingConfig
from decoder.hf_generate import RestDecoding
from rest.datastore import build_datastore
from rest.retriever import LocalRetriever
from rest.tokenizer import tokenizer_fingerprint, tokenizer_name
from tests.decoder.helpers import ARCHS, hf_greedy, make_model, make_tokenizer, prompts

NEW = 24


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """A datastore holding the llama test model's own greedy continuations of the prompts."""
    model, tokenizer = make_model("llama"), make_tokenizer()
    docs = [p + hf_greedy(model, p, 2 * NEW) for p in prompts()]
    path = tmp_path_factory.mktemp("ds") / "ds"
    build_datastore(path, docs, vocab_size=len(tokenizer), tokenizer_name=tokenizer_name(tokenizer),
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))  # fmt: skip
    return LocalRetriever(path)


def plain_and_rest(model, rest, prompt, **kwargs):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        plain = model.generate(ids, pad_token_id=0, **kwargs)
        drafted = model.generate(ids, pad_token_id=0, custom_generate=rest, **kwargs)
    return plain, drafted


@pytest.mark.parametrize("prompt", prompts())
def test_greedy_output_equals_plain_generate_with_drafts_from_the_datastore(retriever, prompt):
    model = make_model("llama")
    datastore_only = DecodingConfig(budget=8, context_drafts=False, served_drafts=False)
    rest = RestDecoding(retriever, make_tokenizer(), datastore_only)
    plain, drafted = plain_and_rest(model, rest, prompt, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(plain, drafted)
    stats = rest.last_result.stats
    assert stats.new_tokens == plain.shape[1] - len(prompt)
    assert stats.steps < stats.new_tokens  # the datastore's drafts were accepted


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_equals_plain_generate_on_every_test_architecture(arch):
    model = make_model(arch)
    rest = RestDecoding(None, make_tokenizer())  # drafts from the context only
    for prompt in prompts():
        plain, drafted = plain_and_rest(model, rest, prompt, max_new_tokens=NEW)
        assert torch.equal(plain, drafted), arch


def test_left_padding_and_return_dict(retriever):
    model = make_model("llama")
    prompt = prompts()[1]
    rest = RestDecoding(retriever, make_tokenizer())
    padded = torch.tensor([[0, 0] + prompt])
    mask = torch.tensor([[0, 0] + [1] * len(prompt)])
    with torch.inference_mode():
        out = model.generate(padded, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, custom_generate=rest,
                             return_dict_in_generate=True)  # fmt: skip
    assert out.sequences[0, :2].tolist() == [0, 0]
    assert out.sequences[0, 2 + len(prompt):].tolist() == hf_greedy(model, prompt, NEW)


def test_sampling_is_repeatable_with_torch_manual_seed(retriever):
    model = make_model("llama")
    rest = RestDecoding(retriever, make_tokenizer())
    ids = torch.tensor([prompts()[0]])

    def sample(seed: int) -> list[int]:
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(ids, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, max_new_tokens=NEW,
                                 pad_token_id=0, custom_generate=rest)  # fmt: skip
        return out[0].tolist()

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


@pytest.mark.parametrize("kwargs", [
    {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"min_new_tokens": 20}, {"eos_token_id": 40},
    {"suppress_tokens": [40, 41]},
])  # fmt: skip
def test_the_generation_config_is_applied_as_plain_generate_applies_it(retriever, kwargs):
    model = make_model("llama")
    rest = RestDecoding(retriever, make_tokenizer())
    for prompt in prompts():
        plain, drafted = plain_and_rest(model, rest, prompt, max_new_tokens=NEW, **kwargs)
        assert torch.equal(plain, drafted), kwargs


class Halve:
    """A logits processor of the caller's own (not one the generation config makes)."""

    def __call__(self, input_ids, scores):
        return scores / 2


@pytest.mark.parametrize("kwargs, message", [
    ({"logits_processor": [Halve()]}, "Halve"),
    ({"max_time": 10.0}, "MaxTimeCriteria"),
    ({"num_beams": 2}, "beam"),
    ({"output_scores": True, "return_dict_in_generate": True}, "sequences only"),
])  # fmt: skip
def test_settings_it_would_not_reproduce_are_refused_by_name(kwargs, message):
    from transformers.generation.logits_process import LogitsProcessorList

    model = make_model("llama")
    if "logits_processor" in kwargs:
        kwargs = {"logits_processor": LogitsProcessorList(kwargs["logits_processor"])}
    with pytest.raises(ValueError, match=message):
        model.generate(torch.tensor([prompts()[0]]), max_new_tokens=4, pad_token_id=0,
                       custom_generate=RestDecoding(None, make_tokenizer()), **kwargs)  # fmt: skip


def test_one_sequence_per_call():
    model = make_model("llama")
    with pytest.raises(ValueError, match="one sequence per call"):
        model.generate(torch.tensor([[5, 6], [7, 8]]), max_new_tokens=4, pad_token_id=0,
                       custom_generate=RestDecoding(None, make_tokenizer()))  # fmt: skip
