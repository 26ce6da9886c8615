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
from pathlib import Path
from typing import Any

PROBE_TEXT = (
    "def fingerprint(x: int) -> str:\n    return f'{x!r}'  # Ünïcödé, 数字 123 4567 89\n"
    "\tThe quick brown fox jumps over the lazy dog.  Two  spaces; tabs\tand\r\nnewlines.\n"
    "<|endoftext|></s><s>[INST] Hello! [/INST] émoji 🙂 -- ... ''' \"\"\" 0x7f 1e-9\n"
)


NAME_MAX_CHARS = 120  # the datastore header holds 128 bytes of name


def reloadable(name_or_path: str) -> str:
    """What loads the same tokenizer from any working directory: a local path made absolute, a
    hub id as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path and path.exists() else name_or_path


def missing_local_path(name_or_path: str) -> bool:
    """A name that can only be a local path (``/x``, ``./x``, ``~/x``, ``a/b/c``; a hub id is
    ``name`` or ``org/name``) and does not exist: no point asking the hub about it."""
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    return looks_local and not Path(name_or_path).expanduser().exists()


def load_tokenizer(name_or_path: str) -> Any:
    """A tokenizer loaded the way users load a model's tokenizer (``AutoTokenizer``); a local
    path is made absolute first, so that ``tokenizer_name`` records where it reloads from."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(reloadable(name_or_path))


def tokenizer_name(tokenizer: Any) -> str:
    """``Class:source`` as datastores record it; the source is a hub id or an absolute path."""
    name = reloadable(getattr(tokenizer, "name_or_path", "") or "") or "unnamed"
    return f"{type(tokenizer).__name__}:{name}"[:NAME_MAX_CHARS]


def tokenizer_source(name: str) -> str | None:
    """The hub id or path in a recorded ``tokenizer_name``; None when there is none (an unnamed
    tokenizer, or a name cut to fit the header)."""
    source = name.split(":", 1)[-1]
    if not source or source == "unnamed" or len(name) >= NAME_MAX_CHARS:
        return None
    return source


class TextCodec:
    """Text to token ids and back, for a ``transformers`` tokenizer or a bare ``tokenizers`` one
    (no special tokens added: the ids are those a datastore holds)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._bare = hasattr(tokenizer, "encode_batch")

    def encode(self, text: str) -> list[int]:
        if self._bare:
            return list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


def load_codec(name_or_path: str, fingerprint: str | None = None) -> TextCodec:
    """A codec for ``name_or_path``. With the ``fingerprint`` it must match, a local
    ``tokenizer.json`` (or one in the Hugging Face cache) is loaded with ``tokenizers`` alone when
    it behaves the same, which starts in milliseconds instead of the seconds ``transformers``
    takes to import; otherwise the tokenizer is loaded as ``load_tokenizer`` does."""
    if fingerprint:
        fast = fast_codec(name_or_path, fingerprint)
        if fast is not None:
            return fast
    return TextCodec(load_tokenizer(name_or_path))


def fast_codec(name_or_path: str, fingerprint: str) -> TextCodec | None:
    """``load_codec``'s fast path alone: None when it does not apply."""
    bare = _bare_tokenizer(name_or_path)
    if bare is None or tokenizer_fingerprint(bare) != fingerprint:
        return None
    return TextCodec(bare)


def _bare_tokenizer(name_or_path: str) -> Any:
    path = Path(name_or_path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else None
    if file is None and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "tokenizer.json")
        except Exception:  # noqa: BLE001 - not a hub id: no fast path, the slow one decides
            cached = None
        file = Path(cached) if isinstance(cached, str) else None
    if file is None or not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception:  # noqa: BLE001 - a file tokenizers cannot read: transformers may
        return None


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
