"""decoder/stopping.py: generation ends at the first EOS, stop string, stop sequence or limit."""

from __future__ import annotations

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from decoder.stopping import StopChecker
from tests.decoder.helpers import make_tokenizer


def test_eos_ends_inside_a_step_and_is_kept() -> None:
    stopper = StopChecker(10, eos_ids={1, 2})
    assert stopper.extend([5, 6]) == [5, 6] and stopper.finish_reason is None
    assert stopper.extend([7, 2, 8, 9]) == [7, 2]
    assert stopper.finish_reason == "eos" and stopper.tokens == [5, 6, 7, 2]
    assert stopper.extend([3]) == []


def test_max_new_tokens_is_exact() -> None:
    stopper = StopChecker(3)
    assert stopper.extend([5, 6]) == [5, 6] and stopper.tokens_left == 1
    assert stopper.extend([7, 8, 9]) == [7]
    assert stopper.finish_reason == "length" and stopper.tokens == [5, 6, 7]


def test_stop_sequences_may_span_steps_and_the_prompt() -> None:
    stopper = StopChecker(10, stop=[[6, 7], [9]])
    assert stopper.extend([5, 6]) == [5, 6]
    assert stopper.extend([7, 8]) == [7]
    assert stopper.finish_reason == "stop"
    spanning = StopChecker(10, stop=[[4, 5, 6]], prompt_ids=[3, 4, 5])
    assert spanning.extend([6, 7]) == [6] and spanning.finish_reason == "stop"
    inside = StopChecker(10, stop=[[4, 5]], prompt_ids=[3, 4, 5])  # wholly in the prompt
    assert inside.extend([6, 4, 5]) == [6, 4, 5] and inside.finish_reason == "stop"
    assert StopChecker(10, stop=[[4, 5]], prompt_ids=[4, 5]).extend([6])[0] == 6


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the stop word stops here, stopper"] * 20, vocab_size=300,
                            min_frequency=2)  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def test_stop_strings_are_matched_as_transformers_matches_them() -> None:
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("a stop here")["input_ids"]
    # The string may end inside the newest token ("sto" + "pper" contains "stop")...
    stopper = StopChecker(20, stop=["stop"], tokenizer=tokenizer)
    taken = stopper.extend(ids)
    assert stopper.finish_reason == "stop"
    assert "stop" in tokenizer.decode(taken) and "here" not in tokenizer.decode(taken)
    # ... and begin in the prompt.
    prompt = tokenizer("a st")["input_ids"]
    rest = tokenizer("op")["input_ids"]
    spanning = StopChecker(20, stop=["stop"], tokenizer=tokenizer, prompt_ids=prompt)
    assert spanning.extend(rest + rest) == rest and spanning.finish_reason == "stop"


def test_eos_beats_length_on_the_same_token() -> None:
    stopper = StopChecker(2, eos_ids={1})
    stopper.extend([5, 1])
    assert stopper.finish_reason == "eos"


def test_bad_stops_are_refused() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        StopChecker(0)
    with pytest.raises(ValueError, match="empty"):
        StopChecker(5, stop=[""], tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match="tokenizer"):
        StopChecker(5, stop=["x"])


def test_stop_strings_on_decoded_text_where_transformers_cannot_read_the_vocabulary() -> None:
    # The word-level test tokenizer: StopStringCriteria cannot clean its vocabulary, so the
    # string is looked for in the decoded text of the last tokens, and must end in the newest.
    tokenizer = make_tokenizer()
    stopper = StopChecker(10, stop=["w7 w8"], tokenizer=tokenizer)
    assert stopper.extend([5, 7]) == [5, 7] and stopper.finish_reason is None
    assert stopper.extend([8, 9]) == [8]
    assert stopper.finish_reason == "stop"
    spanning = StopChecker(10, stop=["w7 w8"], tokenizer=tokenizer, prompt_ids=[5, 7])
    assert spanning.extend([8]) == [8] and spanning.finish_reason == "stop"
    inside = StopChecker(10, stop=["w7 w8"], tokenizer=tokenizer, prompt_ids=[7, 8])
    assert inside.extend([9]) == [9] and inside.finish_reason is None
