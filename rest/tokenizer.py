"""Loading tokenizers as users load them, and fingerprinting their behaviour.

The fingerprint hashes what the tokenizer *does*, not its file: the ids it gives for a fixed probe
text and its vocabulary. The same ``tokenizer.json`` loaded by different classes (a Qwen2 model
directory loads it as ``Qwen2Tokenizer``, with its own pre-tokenization) can tokenize differently,
and a datastore is only useful to a model whose tokenizer behaves exactly like the one it was
built with.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

PROBE_TEXT = (
    "def fingerprint(x: int) -> str:\n    return f'{x!r}'  # Ünïcödé, 数字 123 4567 89\n"
    "\tThe quick brown fox jumps over the lazy dog.  Two  spaces; tabs\tand\r\nnewlines.\n"
    "<|endoftext|></s><s>[INST] Hello! [/INST] émoji 🙂 -- ... ''' \"\"\" 0x7f 1e-9\n"
)


def load_tokenizer(name_or_path: str) -> Any:
    """A tokenizer loaded the way users load a model's tokenizer (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "unnamed"
    return f"{type(tokenizer).__name__}:{name}"[:120]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hex digest of the tokenizer's behaviour: probe-text ids and its vocabulary."""
    if hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "__call__") and not hasattr(
        tokenizer, "encode_batch"
    ):
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        vocab = tokenizer.get_vocab()
    else:  # a bare ``tokenizers.Tokenizer``
        ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
        vocab = tokenizer.get_vocab(with_added_tokens=True)
    digest = hashlib.sha256()
    digest.update(json.dumps(list(ids)).encode())
    digest.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
    return digest.hexdigest()[:32]


def vocab_size_of(tokenizer: Any) -> int:
    """Ids run from 0 to ``vocab_size - 1`` (added tokens included)."""
    if hasattr(tokenizer, "get_vocab"):
        try:
            vocab = tokenizer.get_vocab(with_added_tokens=True)
        except TypeError:
            vocab = tokenizer.get_vocab()
        return max(vocab.values()) + 1
    return len(tokenizer)
