"""Reading documents (texts) from the input formats datastores are built from.

- ``text``: a plain text file is one document.
- ``jsonl``: one JSON object per line; the document is ``record[field]``.
- ``json``: a JSON array of records (ShareGPT dumps are often shipped this way).
- ``parquet``: one row per document, column ``field``.
- ``sharegpt``: records with ``conversations: [{"from": ..., "value": ...}]``: one document per message.
- ``ultrachat``: records with ``data: [str, ...]``: one document per message.

``auto`` picks by extension (.txt/.py/... text, .jsonl, .json, .parquet) and, for JSON records,
detects the chat formats by their keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

FORMATS = ("auto", "text", "jsonl", "json", "parquet", "sharegpt", "ultrachat")


class InputFormatError(ValueError):
    """An input file that cannot be read in the requested format."""


def read_documents(paths: Iterable[str | Path], fmt: str = "auto", field: str = "text") -> Iterator[str]:
    for path in map(Path, paths):
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                yield from _read_file(child, fmt, field)
        else:
            yield from _read_file(path, fmt, field)


def _read_file(path: Path, fmt: str, field: str) -> Iterator[str]:
    if fmt not in FORMATS:
        raise InputFormatError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)}")
    kind = fmt if fmt != "auto" else _kind_from_suffix(path)
    if kind == "text":
        yield path.read_bytes().decode("utf-8", errors="replace")
    elif kind == "parquet":
        yield from _parquet(path, field)
    else:
        records = _json_records(path, jsonl=(kind in ("jsonl",) or path.suffix == ".jsonl"))
        for record in records:
            yield from _record_documents(path, record, fmt, field)


def _kind_from_suffix(path: Path) -> str:
    return {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def _json_records(path: Path, jsonl: bool) -> Iterator[object]:
    with path.open(encoding="utf-8", errors="replace") as f:
        if jsonl:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InputFormatError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        else:
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


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise InputFormatError(f"{path}: no column {field!r} (columns: {', '.join(table.schema_arrow.names)}); use --field")
    for batch in table.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value:
                yield value
