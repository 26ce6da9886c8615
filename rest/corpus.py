"""Real corpora that exist on every machine: the CPython standard library's source.

The recipe is the reference workload's (shared bench/humaneval-replay.md): every ``.py`` file
under ``sysconfig.get_paths()["stdlib"]`` in sorted order, minus tests and site-packages, one
document per file, read as UTF-8 with undecodable bytes replaced.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

EXCLUDED_PREFIXES = ("site-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by their path relative to ``root``."""
    root = root or stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                if not rel.startswith(EXCLUDED_PREFIXES):
                    found.append(rel)
    return [root / rel for rel in sorted(found)]


def stdlib_documents(root: Path | None = None) -> Iterator[str]:
    for path in stdlib_files(root):
        yield path.read_bytes().decode("utf-8", errors="replace")


def site_packages_files() -> list[Path]:
    """The Python sources of installed packages (a larger real code corpus), sorted."""
    return sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py"))


def site_packages_documents(limit_chars: int | None = None) -> Iterator[str]:
    """Python sources of installed packages, in sorted order."""
    total = 0
    for path in site_packages_files():
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
        yield text
        total += len(text)
        if limit_chars is not None and total >= limit_chars:
            return


def repo_cache_dir() -> Path:
    """``<repo>/.cache``: trained tokenizers, tokenized corpora, the demo model (git-ignored)."""
    return Path(os.environ.get("REST_CACHE_DIR", Path(__file__).resolve().parent.parent / ".cache"))


def stdlib_bpe_tokenizer(cache_dir: Path | None = None):
    """The reference workload's tokenizer: ``ByteLevelBPETokenizer`` trained on the standard
    library corpus with ``vocab_size=16384, min_frequency=2``; trained once, then cached."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    path = (cache_dir or repo_cache_dir()) / "stdlib-bpe-16k.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(stdlib_documents(), vocab_size=16384, min_frequency=2, show_progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.rename(path)
    return Tokenizer.from_file(str(path))


def code_documents() -> Iterator[str]:
    """Real code found on this machine, in a fixed order: the standard library, then the Python
    sources of installed packages, then C headers. For benchmarks that need more text than the
    standard library holds."""
    yield from stdlib_documents()
    yield from site_packages_documents()
    include = Path("/usr/include")
    if include.is_dir():
        for path in sorted(include.rglob("*.h")):
            try:
                yield path.read_bytes().decode("utf-8", errors="replace")
            except OSError:
                continue
