"""The decoder's exceptions: each message says what to do next."""

from __future__ import annotations


class DecoderError(Exception):
    """Base class of the decoder's errors."""


class UnsupportedModelError(DecoderError):
    """The model cannot be verified losslessly with tree attention (and would give wrong text)."""


class TokenizerMismatchError(DecoderError):
    """The model's tokenizer does not behave like the one the datastore was built with."""
