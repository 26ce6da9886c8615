"""When generation ends: EOS, stop sequences, stop strings, ``max_new_tokens``.

A step may emit many tokens at once; they are checked one by one, so a stop that falls inside
an accepted path ends the output exactly where plain decoding would have ended it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Enough tokens to spell any stop string: a byte-level tokenizer may need up to 4 tokens per
# character (one per UTF-8 byte).
_TOKENS_PER_CHAR = 4


def eos_token_ids(model: Any) -> frozenset[int]:
    """The model's end-of-sequence ids (its generation config first, as ``generate`` does)."""
    for config in (getattr(model, "generation_config", None), model.config):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


class StopChecker:
    """Tracks the new tokens of one generation and says when and why it ends.

    ``finish_reason``: ``"eos"`` (an EOS token, kept in the output), ``"stop"`` (a stop
    sequence or string, kept in the output), ``"length"`` (``max_new_tokens`` reached), else None.
    """

    def __init__(
        self,
        max_new_tokens: int,
        eos_ids: Iterable[int] = (),
        stop: Sequence[str | Sequence[int]] = (),
        tokenizer: Any = None,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.eos_ids = frozenset(eos_ids)
        self.stop_strings = [s for s in stop if isinstance(s, str)]
        self.stop_sequences = [list(s) for s in stop if not isinstance(s, str)]
        if any(not s for s in self.stop_strings) or any(not s for s in self.stop_sequences):
            raise ValueError("stop strings and stop sequences must not be empty")
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self._window = _TOKENS_PER_CHAR * max((len(s) for s in self.stop_strings), default=0) + 1
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def extend(self, emitted: Sequence[int]) -> list[int]:
        """Append a step's tokens up to and including the first one that ends the generation;
        return the ones appended."""
        taken = []
        for token in emitted:
            if self.finish_reason is not None:
                break
            self.tokens.append(token)
            taken.append(token)
            self.finish_reason = self._reason(token)
        return taken

    def _reason(self, token: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if any(self.tokens[-len(s) :] == s for s in self.stop_sequences):
            return "stop"
        if self.stop_strings:
            # A stop string completed by this token lies within the last few tokens; one that
            # ended earlier would have stopped the generation then.
            tail = self.tokenizer.decode(self.tokens[-self._window :])
            if any(s in tail for s in self.stop_strings):
                return "stop"
        if len(self.tokens) >= self.max_new_tokens:
            return "length"
        return None
