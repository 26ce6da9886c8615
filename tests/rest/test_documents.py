"""rest/documents.py: every input format, and clear errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rest.documents import InputFormatError, read_documents


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
