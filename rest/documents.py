"""Reading documents (texts) from the input formats datastores are built from.

- ``text``: a plain text file is one document.
- ``jsonl``: one JSON object per line; the document is ``record[field]``.
- ``json``: a JSON array of records (ShareGPT dumps are often shipped this way).
- ``parquet``: one row per document, column ``field``.
- ``sharegpt``: records with ``conversations: [{"from": ..., "value": ...}]``: one document per message.
- ``ultrachat``: records with ``data: [str, ...]``: one document per message.

``auto`` picks by extension (.txt/.py/... text, .jsonl, .json, .parquet) and, for JSON records,
detects the chat formats by their keys.

Folders are walked in sorted order. In a folder, hidden entries (names starting with ``.``:
``.git``, ``.venv``...) are left out, and so is every file an ``exclude`` glob matches or, when
``include`` globs are given, that none of them matches. Globs are ``fnmatch`` patterns matched
against the path relative to the folder and against the file's name, so ``*.py`` takes Python
files at any depth and ``tests/*`` leaves a subfolder out. Files named on the command line are
always read. Binary files (a NUL byte in the first 8 KiB, the test git and ripgrep use:
bytecode, images, archives) are skipped and counted, except Parquet files.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("auto", "text", "jsonl", "json", "parquet", "sharegpt", "ultrachat")
BINARY_SNIFF_BYTES = 8192


class InputFormatError(ValueError):
    """An input file that cannot be read in the requested format."""


@dataclass
class ReadSummary:
    """What a ``DocumentReader`` found and read so far. ``total_bytes``: the selected files'
    sizes, known before reading starts (for progress bars)."""

    files: int = 0
    binary_files: int = 0
    excluded_files: int = 0
    documents: int = 0
    bytes_read: int = 0
    total_bytes: int = 0

    def describe(self) -> str:
        skipped = []
        if self.binary_files:
            skipped.append(f"{self.binary_files:,} binary")
        if self.excluded_files:
            skipped.append(f"{self.excluded_files:,} excluded")
        text = f"{_count(self.documents, 'document')} from {_count(self.files, 'file')}"
        return text + (f" (skipped: {', '.join(skipped)})" if skipped else "")


class DocumentReader:
    """The documents of ``paths`` (files and folders), in order; iterate once.

    The files are chosen when the reader is made, so ``summary.total_bytes`` and
    ``summary.excluded_files`` are known before the first document.
    """

    def __init__(
        self,
        paths: Iterable[str | Path],
        fmt: str = "auto",
        field: str = "text",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        if fmt not in FORMATS:
            raise InputFormatError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.fmt = fmt
        self.field = field
        self.summary = ReadSummary()
        self.files: list[Path] = []
        for path in map(Path, paths):
            if path.is_dir():
                chosen, excluded = select_files(path, include, exclude)
                self.files.extend(chosen)
                self.summary.excluded_files += excluded
            elif path.exists():
                self.files.append(path)
            else:
                raise FileNotFoundError(f"input {path} does not exist")
        self.summary.total_bytes = sum(_size(f) for f in self.files)

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            read_before = self.summary.bytes_read
            for document in _read_file(path, self.fmt, self.field, self.summary):
                self.summary.documents += 1
                yield document
            # Whatever the format reported on the way, a finished file counts in full.
            self.summary.bytes_read = read_before + _size(path)


def read_documents(
    paths: Iterable[str | Path],
    fmt: str = "auto",
    field: str = "text",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> Iterator[str]:
    """The documents of ``paths``; ``DocumentReader`` when the summary matters too."""
    return iter(DocumentReader(paths, fmt, field, include, exclude))


def select_files(root: Path, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> tuple[list[Path], int]:
    """The files under ``root`` a build reads, sorted, and how many others were left out
    (hidden, or by the globs). Symbolic links to folders are not followed (no cycles)."""
    chosen: list[tuple[str, Path]] = []
    excluded = 0
    for dirpath, dirnames, filenames in os.walk(root):
        hidden = [d for d in dirnames if d.startswith(".")]
        excluded += sum(_count_files(Path(dirpath, d)) for d in hidden)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if name.startswith(".") or not _wanted(rel, name, include, exclude) or not path.is_file():
                excluded += 1
            else:
                chosen.append((rel, path))
    return [path for _, path in sorted(chosen)], excluded


def is_binary(path: Path) -> bool:
    """A NUL byte in the first 8 KiB (how git and ripgrep tell binary files from text)."""
    with path.open("rb") as f:
        return b"\0" in f.read(BINARY_SNIFF_BYTES)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _wanted(rel: str, name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    def matches(patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in patterns)

    return (not include or matches(include)) and not matches(exclude)


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_file(path: Path, fmt: str, field: str, summary: ReadSummary) -> Iterator[str]:
    kind = fmt if fmt != "auto" else _kind_from_suffix(path)
    if kind != "parquet" and is_binary(path):
        summary.binary_files += 1
        return
    summary.files += 1
    if kind == "text":
        yield path.read_bytes().decode("utf-8", errors="replace")
    elif kind == "parquet":
        yield from _parquet(path, field, summary)
    else:
        records = _json_records(path, jsonl=(kind in ("jsonl",) or path.suffix == ".jsonl"), summary=summary)
        for record in records:
            yield from _record_documents(path, record, fmt, field)


def _kind_from_suffix(path: Path) -> str:
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def _json_records(path: Path, jsonl: bool, summary: ReadSummary) -> Iterator[object]:
    if jsonl:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                summary.bytes_read += len(raw)
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputFormatError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise InputFormatError(f"{path}: not valid JSON: {e.msg}") from None
    yield from data if isinstance(data, list) else [data]


def _record_documents(path: Path, record: object, fmt: str, field: str) -> Iterator[str]:
    if not isinstance(record, dict):
        raise InputFormatError(f"{path}: expected JSON objects, found {type(record).__name__}")
    if fmt == "sharegpt" or (fmt in ("auto", "json", "jsonl") and "conversations" in record and field not in record):
        for message in record.get("conversations") or []:
            value = message.get("value") if isinstance(message, dict) else None
            if isinstance(value, str) and value:
                yield value
    elif fmt == "ultrachat" or (fmt in ("auto", "json", "jsonl") and "data" in record and field not in record):
        for message in record.get("data") or []:
            if isinstance(message, str) and message:
                yield message
    else:
        if field not in record:
            raise InputFormatError(f"{path}: a record has no field {field!r} (fields: {', '.join(record)}); use --field")
        value = record[field]
        if isinstance(value, str) and value:
            yield value


def _parquet(path: Path, field: str, summary: ReadSummary) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise InputFormatError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)}); use --field")
    rows = max(table.metadata.num_rows, 1)
    size = _size(path)
    start = summary.bytes_read
    done = 0
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value:
                yield value
        done += batch.num_rows
        summary.bytes_read = start + size * done // rows
