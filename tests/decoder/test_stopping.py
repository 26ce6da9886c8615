"""decoder/stopping.py: generation ends at the first EOS, stop sequence, stop string or limit."""

from __future__ import annotations

import pytest

from decoder.stopping import StopChecker, eos_token_ids
from tests.decoder.helpers import make_model, make_tokenizer


def test_eos_ends_inside_a_step_and_is_kept() -> None:
    stopper = StopChecker(10, eos_ids={1, 2})
    assert stopper.extend([5, 6]) == [5, 6] and stopper.finish_reason is None
    assert stopper.extend([7, 2, 8, 9]) == [7, 2]
    assert stopper.finish_reason == "eos" and stopper.tokens == [5, 6, 7, 2]
    assert stopper.extend([3]) == []


def test_max_new_tokens_is_exact() -> None:
    stopper = StopChecker(3)
    assert stopper.extend([5, 6]) == [5, 6]
    assert stopper.extend([7, 8, 9]) == [7]
    assert stopper.finish_reason == "length" and stopper.tokens == [5, 6, 7]


def test_stop_sequences_may_span_steps() -> None:
    stopper = StopChecker(10, stop=[[6, 7], [9]])
    assert stopper.extend([5, 6]) == [5, 6]
    assert stopper.extend([7, 8]) == [7]
    assert stopper.finish_reason == "stop"


def test_stop_strings_are_matched_on_text() -> None:
    stopper = StopChecker(10, stop=["w7 w8"], tokenizer=make_tokenizer())
    assert stopper.extend([5, 7]) == [5, 7] and stopper.finish_reason is None
    assert stopper.extend([8, 9]) == [8]
    assert stopper.finish_reason == "stop"


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


def test_eos_ids_come_from_the_generation_config() -> None:
    assert eos_token_ids(make_model("llama")) == {1}
