"""When generation ends: EOS, stop strings, stop token sequences, ``max_new_tokens``.

A step may emit many tokens at once; they are checked one by one, so a stop that falls inside an
accepted path ends the output exactly where plain decoding would have ended it.

Stop strings are matched by transformers' own ``StopStringCriteria``, as ``generate`` matches
them: on the token strings of the whole sequence, prompt included, so a stop string that begins
in the prompt and ends in the output stops it; it must end in the newest token (one that lies
wholly inside the prompt never stops anything). Stop token sequences follow the same rule. For a
tokenizer whose vocabulary ``StopStringCriteria`` cannot read (where ``generate`` itself could not
take stop strings), the same rule is applied to the decoded text of the last tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers.generation.stopping_criteria import StopStringCriteria

# Tokens that may spell one character of decoded text: one per UTF-8 byte.
_TOKENS_PER_CHAR = 4


class StopChecker:
    """Tracks the new tokens of one generation and says when and why it ends.

    ``finish_reason``: ``"eos"`` (an EOS token, kept in the output), ``"stop"`` (a stop string or
    token sequence, kept in the output), ``"length"`` (``max_new_tokens`` reached), else None.
    """

    def __init__(
        self,
        max_new_tokens: int,
        eos_ids: Iterable[int] = (),
        stop: Sequence[str | Sequence[int]] = (),
        tokenizer: Any = None,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.eos_ids = frozenset(eos_ids)
        stop_strings = tuple(dict.fromkeys(s for s in stop if isinstance(s, str)))
        self.stop_sequences = [[int(t) for t in s] for s in stop if not isinstance(s, str)]
        if any(not s for s in stop_strings) or any(not s for s in self.stop_sequences):
            raise ValueError("stop strings and stop sequences must not be empty")
        self._strings = None
        self._text_strings: tuple[str, ...] = ()
        self.tokenizer = tokenizer
        if stop_strings:
            if tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
            try:
                self._strings = StopStringCriteria(tokenizer, list(stop_strings))
            except ValueError:  # transformers cannot read this tokenizer's vocabulary
                self._text_strings = stop_strings
        # The tail of prompt + output that any stop can span: one token per character at most
        # (on decoded text, a byte-level tokenizer may need 4 tokens per character).
        per_char = _TOKENS_PER_CHAR if self._text_strings else 1
        self._span = max(
            [per_char * len(s) + 1 for s in stop_strings] + [len(s) for s in self.stop_sequences],
            default=0,
        )
        self._recent: list[int] = [int(t) for t in prompt_ids][-self._span :] if self._span else []
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @classmethod
    def for_settings(
        cls, settings: Any, stop: Sequence[str | Sequence[int]], tokenizer: Any,
        prompt_ids: Sequence[int],
    ) -> StopChecker:  # fmt: skip
        """The checker of a ``decoder.settings.GenerationSettings`` (its stop strings included)."""
        return cls(
            settings.max_new_tokens, settings.eos_ids, [*settings.stop_strings, *stop], tokenizer,
            prompt_ids,
        )  # fmt: skip

    @property
    def tokens_left(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def extend(self, emitted: Sequence[int]) -> list[int]:
        """Append a step's tokens up to and including the first one that ends the generation;
        return the ones appended."""
        taken = []
        for token in emitted:
            if self.finish_reason is not None:
                break
            token = int(token)
            self.tokens.append(token)
            taken.append(token)
            if self._span:
                self._recent.append(token)
                del self._recent[: -self._span]
            self.finish_reason = self._reason(token)
        return taken

    def _reason(self, token: int) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if any(self._recent[-len(s) :] == s for s in self.stop_sequences):
            return "stop"
        if self._strings is not None:
            recent = torch.tensor([self._recent])  # [1, span]
            if bool(self._strings(recent, None)[0]):
                return "stop"
        if self._text_strings:
            # Found in the text with the newest token, and not without it: it ends there.
            text = self.tokenizer.decode(self._recent)
            before = self.tokenizer.decode(self._recent[:-1])
            if any(s in text and s not in before for s in self._text_strings):
                return "stop"
        if len(self.tokens) >= self.max_new_tokens:
            return "length"
        return None
