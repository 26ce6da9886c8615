"""rest/documents.py: every input format, and clear errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rest.documents import DocumentReader, InputFormatError, read_documents


def test_text_files_and_directories(tmp_path):
    (tmp_path / "a.py").write_text("print('a')\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"caf\xc3\xa9 \xff")
    assert list(read_documents([tmp_path])) == ["print('a')\n", "café \ufffd"]


def test_jsonl_with_a_chosen_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    assert list(read_documents([f], field="body")) == ["one", "two"]
    with pytest.raises(InputFormatError, match="no field 'text'.*use --field"):
        list(read_documents([f]))


def test_sharegpt_one_document_per_message(tmp_path):
    f = tmp_path / "sharegpt.json"
    f.write_text(json.dumps([{"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "hello"}]}]))
    assert list(read_documents([f])) == ["hi", "hello"]
    assert list(read_documents([f], fmt="sharegpt")) == ["hi", "hello"]


def test_ultrachat_one_document_per_message(tmp_path):
    f = tmp_path / "ultra.jsonl"
    f.write_text(json.dumps({"id": 1, "data": ["q?", "a."]}) + "\n")
    assert list(read_documents([f])) == ["q?", "a."]


def test_parquet_column(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x = 1", "y = 2"], "n": [1, 2]}), f)
    assert list(read_documents([f], field="content")) == ["x = 1", "y = 2"]
    with pytest.raises(InputFormatError, match="no column 'text'"):
        list(read_documents([f]))


def test_broken_json_names_the_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(InputFormatError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_documents([f]))


def test_folders_skip_binary_and_hidden_files_and_count_them(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\0\0\0\0zzzz")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "x.py").write_text("hidden\n")
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    reader = DocumentReader([tmp_path])
    assert reader.summary.excluded_files == 2 and reader.summary.total_bytes == 6 + 12
    assert list(reader) == ["x = 1\n"]
    assert (reader.summary.files, reader.summary.binary_files, reader.summary.documents) == (1, 1, 1)
    assert reader.summary.bytes_read == reader.summary.total_bytes
    assert reader.summary.describe() == "1 document from 1 file (skipped: 1 binary, 2 excluded)"


def test_include_and_exclude_globs_match_relative_paths_and_names(tmp_path):
    for rel in ("a.py", "b.md", "sub/c.py", "sub/tests/d.py", "tests/e.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    assert list(read_documents([tmp_path], include=["*.py"])) == ["a.py", "sub/c.py", "sub/tests/d.py", "tests/e.py"]
    assert list(read_documents([tmp_path], include=["*.py"], exclude=["tests/*", "*/tests/*"])) == ["a.py", "sub/c.py"]
    assert list(read_documents([tmp_path], exclude=["sub/*"])) == ["a.py", "b.md", "tests/e.py"]


def test_files_named_explicitly_are_read_whatever_the_globs(tmp_path):
    f = tmp_path / "notes.md"
    f.write_text("n")
    assert list(read_documents([f], include=["*.py"])) == ["n"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DocumentReader([tmp_path / "missing.txt"])


def test_jsonl_progress_counts_bytes_as_records_are_read(tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)]
    f.write_text("".join(lines))
    reader = DocumentReader([f])
    seen = []
    for _ in reader:
        seen.append(reader.summary.bytes_read)
    assert seen == [len(lines[0]), 2 * len(lines[0]), 3 * len(lines[0])]
