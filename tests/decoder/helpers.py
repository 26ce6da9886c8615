"""Tiny random-weight models, a word-level tokenizer and fake draft sources for decoder tests."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from decoder.draft_sources import DraftSource
from decoder.draft_tree import Level
from decoder.model_support import sequential_logits
from decoder.settings import GenerationSettings, resolve_settings
from rest.retriever import RetrievalSession, Retriever
from rest.tokenizer import tokenizer_fingerprint
from rest.types import DatastoreInfo, SearchParams, SearchResult

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
ATTENTIONS = ("sdpa", "eager")
VOCAB = 96
EOS = 1

torch.set_num_threads(1)  # the tiny models gain nothing from threads; the machine is shared


@functools.lru_cache(maxsize=None)
def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Words ``w3`` .. ``w{vocab_size-1}``; id 0 is padding, id 1 is ``</s>``, id 2 unknown."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def model_config(arch: str, vocab_size: int = VOCAB, **overrides):
    common = dict(vocab_size=vocab_size, eos_token_id=EOS, bos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "mistral": MistralConfig}[arch]  # fmt: skip
        config = cls(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **common,
        )  # fmt: skip
    # Larger weights than the default 0.02: peakier logits, so that argmax ties (which float
    # rounding could break either way) are rare, and greedy output repeats itself (prompt lookup
    # then has something to find).
    config.initializer_range = 0.3
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@functools.lru_cache(maxsize=None)
def make_model(arch: str, attn: str = "sdpa", vocab_size: int = VOCAB, seed: int | None = None):
    """A 2-layer, 32-wide random model in float32 (cached: tests must not modify it). Each
    architecture gets its own default seed (Llama and Mistral would otherwise be the same model)."""
    torch.manual_seed(ARCHS.index(arch) if seed is None else seed)
    config = model_config(arch, vocab_size)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


def hf_greedy(model, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The reference: transformers' own greedy generate (new tokens only)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def sampling_settings(model, prompt: Sequence[int], options: dict) -> GenerationSettings:
    """The settings ``generate(do_sample=True, **options)`` resolves for ``prompt``."""
    return resolve_settings(model, prompt, None, {"do_sample": True, **options})


def sampling_probs(model, settings: GenerationSettings, ids: Sequence[int]) -> torch.Tensor:
    """The distribution plain sampling draws the token after ``ids`` from: [vocab]."""
    with torch.inference_mode():
        logits = sequential_logits(model, list(ids))[None]  # [1, vocab]
        scores = settings.processors(torch.tensor([list(ids)]), logits)
    return torch.softmax(scores[0], dim=-1)


def prompts(n: int = 3, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for length in (3, 8, 17)][:n]


class FunctionSource(DraftSource):
    """Drafts computed by a function of the context."""

    def __init__(self, propose: Callable[[Sequence[int]], list[Level]]) -> None:
        self._propose = propose

    def propose(self, context: Sequence[int]) -> list[Level]:
        return self._propose(context)


def scored_level(tokens, parents, scores, match_length: int = 1 << 20) -> Level:
    """A level that gives node ``i`` the score ``scores[i]`` (capped by its parent's): one
    occurrence, fully trusted, counts equal to the scores. Its match length puts it before
    every real source's levels, which get only what it leaves."""
    return Level.from_trie(match_length, 1, tuple(tokens), tuple(parents), tuple(scores), 0.0)


def chain(tokens: Sequence[int], score: float = 0.9) -> Level:
    return scored_level(tokens, range(-1, len(tokens) - 1), [score] * len(tokens))


def oracle_source(target: Sequence[int], depth: int = 10) -> FunctionSource:
    """Drafts the next ``depth`` tokens of ``target`` while the context is a prefix of it."""

    def propose(context: Sequence[int]) -> list[Level]:
        if list(target[: len(context)]) != list(context):
            return []
        return [chain(target[len(context) : len(context) + depth])]

    return FunctionSource(propose)


def random_level(rng: random.Random, size: int, vocab: int = VOCAB, tokens=None) -> Level:
    """A random tree: random parents (earlier nodes), random tokens, random scores."""
    parents = tuple(rng.randrange(-1, i) for i in range(size))
    toks = tuple(rng.choice(tokens) if tokens else rng.randrange(vocab) for _ in range(size))
    return scored_level(toks, parents, tuple(rng.random() for _ in range(size)))


def random_source(seed: int = 0, size: int = 12, tokens=None) -> FunctionSource:
    rng = random.Random(seed)
    return FunctionSource(
        lambda context: [random_level(rng, rng.randrange(size + 1), tokens=tokens)]
    )


def eos_source(target: Sequence[int], eos: int = EOS) -> FunctionSource:
    """The right continuation, plus at every depth a branch that ends with EOS instead."""

    def propose(context: Sequence[int]) -> list[Level]:
        if list(target[: len(context)]) != list(context):
            return [scored_level((eos,), (-1,), (0.9,))]
        nxt = list(target[len(context) : len(context) + 6])
        tokens, parents = [], []
        for i, token in enumerate(nxt):
            parent = -1 if i == 0 else 2 * (i - 1)
            tokens += [token, eos]
            parents += [parent, parent]
        return [scored_level(tokens, parents, [0.5] * len(tokens))]

    return FunctionSource(propose)


class FakeRetriever(Retriever):
    """A retriever whose sessions answer with ``search(context, params)``."""

    def __init__(self, search: Callable, tokenizer=None) -> None:
        self._search = search
        self.fingerprint = tokenizer_fingerprint(tokenizer or make_tokenizer())
        self.sessions_opened = 0
        self.sessions_closed = 0

    def info(self) -> DatastoreInfo:
        return DatastoreInfo(1, VOCAB, 0, 0, "fake", self.fingerprint)

    def session(self) -> RetrievalSession:
        self.sessions_opened += 1
        return _FakeSession(self)


class _FakeSession(RetrievalSession):
    def __init__(self, retriever: FakeRetriever) -> None:
        self.retriever = retriever

    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult | None:
        return self.retriever._search(context, params)

    def close(self) -> None:
        self.retriever.sessions_closed += 1


def chi_square_pvalue(samples: Sequence, expected: dict) -> float:
    """Goodness of fit of ``samples`` to the distribution ``expected`` (outcome -> probability).

    Outcomes expected fewer than 5 times are pooled into one cell, as the test needs; an outcome
    of probability zero that occurs fails outright.
    """
    n = len(samples)
    counts: dict = {}
    for sample in samples:
        counts[sample] = counts.get(sample, 0) + 1
    if any(expected.get(outcome, 0.0) == 0.0 for outcome in counts):
        return 0.0
    cells, pooled_observed, pooled_expected = [], 0, 0.0
    for outcome, p in expected.items():
        if n * p >= 5:
            cells.append((counts.get(outcome, 0), n * p))
        else:
            pooled_observed += counts.get(outcome, 0)
            pooled_expected += n * p
    if pooled_expected > 0:
        cells.append((pooled_observed, pooled_expected))
    statistic = sum((o - e) ** 2 / e for o, e in cells)
    dof = len(cells) - 1
    return torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    ).item()
