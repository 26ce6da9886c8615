"""decoder/generator.py: the output is the model's own, whatever the drafts."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch

from decoder import (
    DecodingConfig,
    RestGenerator,
    TokenizerMismatchError,
)
from decoder.budget import CostModel
from decoder.testing import InMemoryRetriever
from rest.tokenizer import tokenizer_fingerprint
from rest.types import EMPTY_RESULT
from tests.decoder.helpers import (
    ARCHS,
    ATTENTIONS,
    EOS,
    VOCAB,
    FakeRetriever,
    FunctionSource,
    chain,
    chi_square_pvalue,
    eos_source,
    hf_greedy,
    make_model,
    make_tokenizer,
    model_config,
    oracle_source,
    prompts,
    random_source,
    sampling_probs,
    sampling_settings,
    scored_level,
)

MAX_NEW = 24
FIXED = DecodingConfig(budget=16)


def oracle_retriever(sequences) -> InMemoryRetriever:
    return InMemoryRetriever(sequences, tokenizer_fingerprint(make_tokenizer()))


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_output_equals_transformers_generate(arch: str, attn: str) -> None:
    model = make_model(arch, attn)
    tokenizer = make_tokenizer()
    # One generator for every prompt, drafting from the context and from its own earlier
    # outputs (each prompt twice: the second time its whole output was served before).
    shared = RestGenerator(model, tokenizer, config=FIXED)
    for prompt in prompts():
        want = hf_greedy(model, prompt, MAX_NEW)
        target = prompt + want
        for _ in range(2):
            assert shared.generate(prompt, MAX_NEW).tokens == want, ("shared", prompt)
        good = RestGenerator(model, tokenizer, oracle_retriever([target]), FIXED)
        wrong = RestGenerator(model, tokenizer, config=FIXED, draft_sources=[random_source(1)])
        with_eos = RestGenerator(model, tokenizer, config=FIXED, draft_sources=[eos_source(target)])
        empty = RestGenerator(
            model, tokenizer, FakeRetriever(lambda c, p: EMPTY_RESULT),
            DecodingConfig(budget=16, context_drafts=False),
        )  # fmt: skip
        cases = {"good": good, "wrong": wrong, "eos": with_eos, "empty": empty}
        results = {name: g.generate(prompt, MAX_NEW) for name, g in cases.items()}
        for name, result in results.items():
            assert result.tokens == want, (name, prompt)
        assert results["empty"].stats.draft_tokens == 0
        plain = good.generate(prompt, MAX_NEW, plain=True)
        assert plain.tokens == want and plain.stats.steps == len(want)
        if len(want) > 3:  # the good drafts were used: several tokens per step (prefill: one)
            assert results["good"].stats.steps <= 1 + math.ceil((len(want) - 1) / 6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_seed_samples_the_same_tokens_with_or_without_drafts(arch: str) -> None:
    # One uniform per emitted token, drawn in order: drafts change how many tokens a step makes,
    # never which tokens.
    model, tokenizer = make_model(arch), make_tokenizer()
    prompt = prompts()[1]
    kwargs = dict(temperature=0.7, top_p=0.9, top_k=30)
    accepted = 0
    for seed in range(6):
        plain = RestGenerator(model, tokenizer, config=FIXED).generate(
            prompt, MAX_NEW, seed=seed, plain=True, **kwargs
        )
        oracle = oracle_source(prompt + plain.tokens)
        for source in (oracle, random_source(seed)):
            generator = RestGenerator(model, tokenizer, config=FIXED, draft_sources=[source])
            result = generator.generate(prompt, MAX_NEW, seed=seed, **kwargs)
            assert result.tokens == plain.tokens
            accepted += result.stats.accepted_draft_tokens
        again = generator.generate(prompt, MAX_NEW, seed=seed, **kwargs)
        assert again.tokens == plain.tokens  # a seed makes runs repeatable
        own = torch.Generator().manual_seed(seed)
        assert generator.generate(prompt, MAX_NEW, seed=own, **kwargs).tokens == plain.tokens
    assert accepted > 6 * MAX_NEW / 2


SAMPLING = [
    dict(temperature=1.0, top_k=3),
    # transformers' processors that read the history, each node fed its own
    dict(temperature=0.9, top_k=0, repetition_penalty=3.0, min_p=0.05, typical_p=0.95),
]


@pytest.mark.parametrize("options", SAMPLING, ids=["top-k", "penalty-min-p-typical-p"])
def test_sampled_continuations_follow_plain_sampling_distribution(options) -> None:
    # End to end through generate(): two-token continuations from a tiny-vocabulary model. The
    # prefill draws the first token; the second is drawn by walking a tree of three siblings
    # (one with a child), drafted after the first token and verified by the next step.
    vocab, prompt = 8, [3]
    model = make_model("qwen2", "sdpa", vocab_size=vocab, seed=5)
    settings = sampling_settings(model, prompt, options)
    first = sampling_probs(model, settings, prompt)
    second = [sampling_probs(model, settings, prompt + [t]) for t in range(vocab)]
    exact = {(a, b): (first[a] * second[a][b]).item() for a in range(vocab) for b in range(vocab)}
    for b in range(vocab):  # plain sampling stops at EOS too
        exact[(EOS,)] = exact.get((EOS,), 0.0) + exact.pop((EOS, b))
    a = first.argmax().item()
    b, c, d = second[a].argsort(descending=True)[:3].tolist()
    tree = scored_level((b, c, d, a), (-1, -1, -1, 0), (0.3, 0.3, 0.3, 0.1))
    source = FunctionSource(lambda context: [tree] if list(context) == prompt + [a] else [])
    generator = RestGenerator(
        model, make_tokenizer(vocab), config=DecodingConfig(budget=8, context_drafts=False),
        draft_sources=[source],
    )  # fmt: skip
    samples = []
    for seed in range(800):
        result = generator.generate(prompt, 2, seed=seed, **options)
        samples.append(tuple(result.tokens))
    assert chi_square_pvalue(samples, exact) > 0.01
    assert sum(s[0] == a for s in samples) > 0.2 * len(samples)  # the tree was verified


class Unreachable(FakeRetriever):
    def session(self):
        raise ConnectionError("no route to the retriever")


@pytest.mark.parametrize("failure", ["none", "raises", "slow", "session"])
def test_failed_or_late_retrieval_leaves_the_output_unchanged(failure: str) -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[0]
    want = hf_greedy(model, prompt, MAX_NEW)
    oracle = oracle_retriever([prompt + want])
    calls = []

    def search(context, params):
        calls.append(len(calls))
        if len(calls) % 2:  # every other call fails
            if failure == "none":
                return None
            if failure == "raises":
                raise ConnectionError("shard down")
            if failure == "slow" and len(calls) == 1:
                time.sleep(1.0)  # far past the deadline: the generation must not wait for it
        return oracle.search(context, params)

    retriever = (Unreachable if failure == "session" else FakeRetriever)(search)
    # One search per step, so that "every other call" fails every other step.
    config = DecodingConfig(budget=16, context_drafts=False, retrieval_deadline_s=0.05,
                            retrieval_levels=1)  # fmt: skip
    result = RestGenerator(model, tokenizer, retriever, config).generate(prompt, MAX_NEW)
    assert result.tokens == want
    if failure == "session":
        assert result.stats.draft_tokens == 0
    else:
        assert result.stats.retrieval_failures >= 1
        if failure == "slow":
            assert result.stats.retrieval_s < 0.5
        else:
            assert result.stats.accepted_draft_tokens > 0  # the calls that worked were used
        give_up = time.monotonic() + 5  # a late call still running closes its session after it
        while retriever.sessions_closed == 0 and time.monotonic() < give_up:
            time.sleep(0.01)
        assert retriever.sessions_closed == retriever.sessions_opened == 1


def test_adaptive_budget_picks_a_size_and_keeps_the_output() -> None:
    model, tokenizer = make_model("qwen3"), make_tokenizer()
    prompt = prompts()[2]
    want = hf_greedy(model, prompt, MAX_NEW)
    generator = RestGenerator(model, tokenizer, oracle_retriever([prompt + want]))
    assert generator.config.adaptive and generator.cost_model is None
    result = generator.generate(prompt, MAX_NEW)
    assert result.tokens == want
    cost = generator.cost_model
    assert cost is not None and cost.sizes[-1] == generator.config.max_budget + 1
    assert all(s > 0 for s in cost.seconds)
    # Confident drafts (score 1 along the true path) are worth verifying: steps emit several.
    assert 0 < result.stats.draft_tokens and result.stats.steps < len(want) / 2


def fresh_model_with_eos(eos):
    # A fresh instance: the cached models are shared and must not be modified.
    model = make_model.__wrapped__("llama", "sdpa")
    model.generation_config.eos_token_id = eos
    return model


def test_eos_inside_an_accepted_path_ends_the_output_there() -> None:
    tokenizer = make_tokenizer()
    prompt = prompts()[0]
    full = hf_greedy(make_model("llama"), prompt, MAX_NEW)
    assert EOS not in full
    cut = next(i for i in range(5, MAX_NEW) if full[i] not in full[:i])
    model = fresh_model_with_eos([full[cut], EOS])  # a list of ids, as some models have
    want = hf_greedy(model, prompt, MAX_NEW)
    assert want == full[: cut + 1]
    generator = RestGenerator(model, tokenizer, oracle_retriever([prompt + full]), FIXED)
    result = generator.generate(prompt, MAX_NEW)
    assert result.tokens == want and result.finish_reason == "eos"
    assert result.stats.steps == 2  # the prefill, then a step whose accepted path held the EOS


def test_stop_sequences_inside_an_accepted_path() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[0]
    full = hf_greedy(model, prompt, MAX_NEW)
    generator = RestGenerator(model, tokenizer, oracle_retriever([prompt + full]), FIXED)

    def first_end(seq):  # where plain decoding would stop: just after the first occurrence
        return next(i + len(seq) for i in range(len(full)) if full[i : i + len(seq)] == seq)

    seq = full[4:6]
    result = generator.generate(prompt, MAX_NEW, stop=[seq])
    assert result.tokens == full[: first_end(seq)] and result.finish_reason == "stop"
    assert result.stats.steps == 2  # the prefill, then one step that accepted past the stop


def byte_level_setup():
    """A byte-level BPE tokenizer (stop strings need real token strings) and a model over it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def stop(): return stopping + stopped\n"] * 20, vocab_size=300,
                            min_frequency=2)  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(model_config("llama", len(tokenizer))).eval()
    return model, tokenizer


def test_stop_strings_stop_where_transformers_stops_them() -> None:
    model, tokenizer = byte_level_setup()
    prompt = tokenizer("def stop(): re")["input_ids"]
    full = hf_greedy(model, prompt, 40)
    text = tokenizer.decode(full)
    # A stop string made of the output's own characters, and one that starts in the prompt.
    inside = text[5:8]
    spanning = "re" + tokenizer.decode(full[:1])[:2]
    retriever = InMemoryRetriever([prompt + full], tokenizer_fingerprint(tokenizer))
    generator = RestGenerator(model, tokenizer, retriever, FIXED)
    for stop in (inside, spanning):
        want = hf_greedy(model, prompt, 40, stop_strings=[stop], tokenizer=tokenizer)
        result = generator.generate(prompt, 40, stop=[stop])
        assert result.tokens == want, stop
        assert result.finish_reason == ("stop" if len(want) < 40 else "length")
    assert len(hf_greedy(model, prompt, 40, stop_strings=[spanning], tokenizer=tokenizer)) <= 2
    model.generation_config.stop_strings = [inside]  # the model's own generation config
    want = hf_greedy(model, prompt, 40, tokenizer=tokenizer)
    assert generator.generate(prompt, 40).tokens == want and len(want) < 40


@pytest.mark.parametrize("max_new", [1, 2, 5, 11, 13, 24])
def test_max_new_tokens_is_exact(max_new: int) -> None:
    model, tokenizer = make_model("mistral"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, max_new)
    full = hf_greedy(model, prompt, MAX_NEW)
    assert EOS not in full  # so that every length is reached
    generator = RestGenerator(model, tokenizer, oracle_retriever([prompt + full]), FIXED)
    result = generator.generate(prompt, max_new)
    assert result.tokens == want and len(want) == max_new
    assert result.finish_reason == "length" and result.stats.new_tokens == max_new


def test_tokenizer_mismatch_is_refused_unless_allowed() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    other = make_tokenizer(64)
    retriever = FakeRetriever(lambda c, p: EMPTY_RESULT, tokenizer=other)
    with pytest.raises(TokenizerMismatchError) as refused:
        RestGenerator(model, tokenizer, retriever)
    message = str(refused.value)
    assert "fake" in message and "PreTrainedTokenizerFast" in message
    assert tokenizer_fingerprint(other) in message and tokenizer_fingerprint(tokenizer) in message
    assert "allow_tokenizer_mismatch=True" in message
    allowed = RestGenerator(
        model, tokenizer, retriever, DecodingConfig(budget=4, allow_tokenizer_mismatch=True)
    )
    prompt = prompts()[0]
    assert allowed.generate(prompt, 8).tokens == hf_greedy(model, prompt, 8)


def test_out_of_vocabulary_drafts_are_dropped() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[0]
    source = FunctionSource(lambda context: [scored_level((10_000, 5), (-1, 0), (1.0, 1.0))])
    config = DecodingConfig(budget=16, context_drafts=False)
    generator = RestGenerator(model, tokenizer, config=config, draft_sources=[source])
    result = generator.generate(prompt, 8)
    assert result.tokens == hf_greedy(model, prompt, 8)
    assert result.stats.draft_tokens == 0  # the child went with its out-of-range parent


def test_stream_yields_each_step_and_adds_up_to_the_result() -> None:
    model, tokenizer = make_model("gpt2"), make_tokenizer()
    prompt = "w5 w7 w9 w11"
    ids = tokenizer(prompt)["input_ids"]
    assert ids == [5, 7, 9, 11]
    want = hf_greedy(model, ids, MAX_NEW)
    generator = RestGenerator(model, tokenizer, oracle_retriever([ids + want]), FIXED)
    stream = generator.stream(prompt, MAX_NEW)
    chunks = list(stream)
    result = stream.result
    assert result is not None and result.tokens == want
    assert [t for chunk in chunks for t in chunk.tokens] == want
    assert "".join(chunk.text for chunk in chunks) == result.text == tokenizer.decode(
        want, skip_special_tokens=True
    )
    assert len(chunks) == result.stats.steps < len(want)


def test_stopping_a_stream_early_closes_the_retrieval_session() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    retriever = FakeRetriever(lambda c, p: EMPTY_RESULT)
    stream = RestGenerator(model, tokenizer, retriever, FIXED).stream(prompts()[0], MAX_NEW)
    for _ in stream:
        break  # leaving the loop drops the iterator, which closes the steps
    assert retriever.sessions_closed == retriever.sessions_opened == 1
    assert stream.result is None


def test_statistics_describe_the_call() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, MAX_NEW)
    generator = RestGenerator(model, tokenizer, oracle_retriever([prompt + want]), FIXED)
    stats = generator.generate(prompt, MAX_NEW).stats
    assert stats.prompt_tokens == len(prompt) and stats.new_tokens == len(want)
    assert stats.mean_accepted == pytest.approx(len(want) / stats.steps)
    assert stats.draft_tokens >= stats.accepted_draft_tokens > 0
    assert 0 < stats.prefill_s and 0 < stats.retrieval_s and 0 < stats.verification_s
    assert stats.prefill_s + stats.retrieval_s + stats.verification_s <= stats.total_s
    assert stats.tokens_per_s == pytest.approx(stats.new_tokens / stats.total_s)
    assert set(stats.as_dict()) >= {"steps", "mean_accepted", "tokens_per_s", "retrieval_s"}


def test_bad_requests_are_refused() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    generator = RestGenerator(model, tokenizer, config=FIXED)
    with pytest.raises(ValueError, match="empty"):
        generator.generate([], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate([5], 0)
    with pytest.raises(ValueError, match="top_p"):
        generator.generate([5], 4, temperature=1.0, top_p=0.0)


def test_generation_past_a_sliding_window_is_exact() -> None:
    from transformers import AutoModelForCausalLM

    config = model_config("mistral", sliding_window=6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    prompt = prompts()[1]  # 8 tokens: the prompt alone is wider than the window
    want = hf_greedy(model, prompt, 40)
    generator = RestGenerator(model, make_tokenizer(), oracle_retriever([prompt + want]), FIXED)
    result = generator.generate(prompt, 40)
    assert result.tokens == want and result.stats.steps < 20


def test_drafts_from_a_real_datastore(tmp_path) -> None:
    datastore = pytest.importorskip("rest.datastore", reason="the datastore engine is not built")
    from rest.retriever import LocalRetriever
    from rest.tokenizer import tokenizer_name

    model, tokenizer = make_model("qwen2"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, MAX_NEW)
    datastore.build_datastore(
        tmp_path / "ds", [prompt + want, prompts()[2]], vocab_size=len(tokenizer),
        tokenizer_name=tokenizer_name(tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )  # fmt: skip
    retriever = LocalRetriever(str(tmp_path / "ds"))
    config = DecodingConfig(budget=16, context_drafts=False)
    result = RestGenerator(model, tokenizer, retriever, config).generate(prompt, MAX_NEW)
    assert result.tokens == want
    assert result.stats.steps < len(want) / 2 and result.stats.retrieval_failures == 0


def test_incremental_detokenizer_holds_back_split_characters() -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from decoder.generator import IncrementalDetokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300, min_frequency=2)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    text = "def grüße(x): return '🙂' + x"
    ids = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # a character split over tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add([i]) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_served_outputs_draft_later_calls_never_the_current_one() -> None:
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, MAX_NEW)
    config = DecodingConfig(budget=16, context_drafts=False)
    generator = RestGenerator(model, tokenizer, config=config)
    first = generator.generate(prompt, MAX_NEW)
    assert first.tokens == want
    # Nothing was served before: the output could not draft itself while it was made.
    assert first.stats.draft_tokens == 0
    assert generator.served is not None and generator.served.tokens == len(want) + 1
    again = generator.generate(prompt, MAX_NEW)
    assert again.tokens == want
    assert again.stats.accepted_draft_tokens > len(want) / 2  # now it was served before
    forgetful = RestGenerator(model, tokenizer, config=replace(config, served_drafts=False))
    forgetful.generate(prompt, MAX_NEW)
    assert forgetful.served is None
    assert forgetful.generate(prompt, MAX_NEW).stats.draft_tokens == 0


def test_over_confident_drafts_shrink_the_adaptive_budget() -> None:
    # A source claiming certainty for a chain that is always wrong: the correction learns not
    # to verify it, the uncorrected budget verifies all of it every step.
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, MAX_NEW)
    target = prompt + want

    def wrong(context):
        right = target[len(context)] if len(context) < len(target) else 3
        bad = 3 + (right - 3 + 1) % (VOCAB - 3)  # never the model's token, never EOS
        return [chain([bad] * 8, score=1.0)]

    # 1 ms per forward pass plus 0.1 ms per node: certain nodes are worth verifying.
    cost = CostModel((1, 65), (1e-3, 1e-3 + 64e-4))
    drafted = {}
    for correct in (False, True):
        # The injected cost is what steps cost (no cost correction learns the real ones), and no
        # drafting gate: a drafting phase slowed by load elsewhere must not skip steps.
        config = DecodingConfig(context_drafts=False, served_drafts=False, score_correction=correct,
                                cost_correction=False, drafting_gate=False)  # fmt: skip
        generator = RestGenerator(model, tokenizer, config=config,
                                  draft_sources=[FunctionSource(wrong)])  # fmt: skip
        generator.cost_model = cost
        result = generator.generate(prompt, MAX_NEW)
        assert result.tokens == want
        drafted[correct] = result.stats.draft_tokens
    # Every step after the prefill verifies the chain, cut to the tokens left minus one.
    assert drafted[False] == sum(min(8, left - 1) for left in range(1, MAX_NEW))
    assert drafted[True] < drafted[False] / 2


# --- retrieval faults ---------------------------------------------------------------------------


def test_an_answer_with_invalid_parents_costs_one_plain_step() -> None:
    from rest.types import SearchResult

    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, MAX_NEW)
    oracle = oracle_retriever([prompt + want])
    calls = []

    def search(context, params):
        calls.append(1)
        if len(calls) == 2:  # a child listed before its parent: the scorer refuses it
            return SearchResult(match_length=1, occurrences=2, tokens=(5, 6), parents=(1, -1),
                                counts=(1, 2))  # fmt: skip
        return oracle.search(context, params)

    config = DecodingConfig(budget=16, retrieval_levels=1)
    generator = RestGenerator(model, tokenizer, FakeRetriever(search), config)
    result = generator.generate(prompt, MAX_NEW)
    assert result.tokens == want
    assert result.stats.retrieval_failures == 1
    assert result.stats.accepted_draft_tokens > 0  # the other steps drafted


class DownAtFirst(FakeRetriever):
    """A retriever that does not answer ``info()`` until ``up`` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.up = False

    def info(self):
        from rest.retriever import RetrieverUnavailable

        if not self.up:
            raise RetrieverUnavailable("connection refused")
        return super().info()


def test_a_retriever_down_at_start_is_used_once_it_answers(caplog, monkeypatch) -> None:
    import decoder.generator

    monkeypatch.setattr(decoder.generator, "RETRIEVER_RETRY_S", 0.0)
    model, tokenizer = make_model("llama"), make_tokenizer()
    prompt = prompts()[1]
    want = hf_greedy(model, prompt, MAX_NEW)
    oracle = oracle_retriever([prompt + want])
    retriever = DownAtFirst(lambda c, p: oracle.search(c, p))
    config = DecodingConfig(budget=16, context_drafts=False, served_drafts=False)
    with caplog.at_level("WARNING"):
        generator = RestGenerator(model, tokenizer, retriever, config)
    assert sum("does not answer" in r.message for r in caplog.records) == 1
    down = generator.generate(prompt, MAX_NEW)
    assert down.tokens == want and down.stats.draft_tokens == 0
    assert retriever.sessions_opened == 0
    retriever.up = True
    again = generator.generate(prompt, MAX_NEW)
    assert again.tokens == want and again.stats.accepted_draft_tokens > 0
    assert retriever.sessions_opened == 1
    assert sum("does not answer" in r.message for r in caplog.records) == 1  # one warning


def test_a_retriever_that_comes_up_with_another_tokenizer_is_refused(monkeypatch) -> None:
    import decoder.generator

    monkeypatch.setattr(decoder.generator, "RETRIEVER_RETRY_S", 0.0)
    model, tokenizer = make_model("llama"), make_tokenizer()
    retriever = DownAtFirst(lambda c, p: EMPTY_RESULT, tokenizer=make_tokenizer(64))
    generator = RestGenerator(model, tokenizer, retriever, FIXED)
    retriever.up = True
    with pytest.raises(TokenizerMismatchError):
        generator.generate(prompts()[0], 4)


def test_require_retriever_asks_for_the_error() -> None:
    from rest.retriever import RetrieverUnavailable

    retriever = DownAtFirst(lambda c, p: EMPTY_RESULT)
    config = DecodingConfig(budget=4, require_retriever=True)
    with pytest.raises(RetrieverUnavailable, match="refused"):
        RestGenerator(make_model("llama"), make_tokenizer(), retriever, config)


def test_reproducible_calls_draft_the_same_trees_in_bfloat16() -> None:
    # In bfloat16 a tree step rounds differently from a plain one, so the trees may change the
    # output; by default they change from call to call (the first output is served to the
    # second). With reproducible=True both calls verify the same trees and give the same tokens.
    model = make_model.__wrapped__("llama", "sdpa").to(torch.bfloat16)
    tokenizer = make_tokenizer()
    prompt = prompts()[2]
    default = RestGenerator(model, tokenizer, config=DecodingConfig(budget=16))
    first, second = (default.generate(prompt, MAX_NEW, seed=1) for _ in range(2))
    assert first.stats.draft_tokens != second.stats.draft_tokens  # other trees the second time
    steady = RestGenerator(model, tokenizer, config=DecodingConfig(reproducible=True))
    runs = [steady.generate(prompt, MAX_NEW, seed=1) for _ in range(3)]
    assert len({tuple(r.tokens) for r in runs}) == 1
    assert len({r.stats.draft_tokens for r in runs}) == 1 and steady.served is None
