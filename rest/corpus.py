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


def site_packages_documents(limit_chars: int | None = None) -> Iterator[str]:
    """Python sources of installed packages (a larger real code corpus), in sorted order."""
    root = Path(sysconfig.get_paths()["purelib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
        yield text
        total += len(text)
        if limit_chars is not None and total >= limit_chars:
            return
