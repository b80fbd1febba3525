from __future__ import annotations

import json

import pytest

from moekit.data import load_documents


def test_txt_one_document_per_file_label_is_stem(tmp_path):
    (tmp_path / "poems.txt").write_text("roses are red\nviolets are blue\n")
    (tmp_path / "notes.txt").write_text("ünïcode ok")
    docs = load_documents([tmp_path / "poems.txt", tmp_path / "notes.txt"])
    assert [(d.label, d.text) for d in docs] == [
        ("poems", "roses are red\nviolets are blue\n"),
        ("notes", "ünïcode ok"),
    ]
    fixed = load_documents(tmp_path / "notes.txt", label="misc")
    assert fixed[0].label == "misc"


def test_jsonl_with_label_field_and_directory(tmp_path, jsonl_files):
    docs = load_documents(tmp_path, label_field="domain")  # the directory holds the two .jsonl files
    assert len(docs) == 24
    assert {d.label for d in docs} == {"low", "num"}
    assert docs[0].source.endswith("part0.jsonl:1")
    unlabelled = load_documents(jsonl_files[0])
    assert {d.label for d in unlabelled} == {"part0"}


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["alpha text", "beta text"], "lang": [1, 2]}), path)
    docs = load_documents(path, text_field="body", label_field="lang")
    assert [(d.text, d.label) for d in docs] == [("alpha text", "1"), ("beta text", "2")]
    with pytest.raises(KeyError, match=r"expected column\(s\) \['text'\], found columns \['body', 'lang'\]"):
        load_documents(path)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path .*nope\.jsonl does not exist"):
        load_documents(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"expected one of \.txt, \.jsonl, \.parquet, found '\.csv'"):
        load_documents(tmp_path / "data.csv")


def test_missing_field_names_line_and_found_fields(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok", "domain": "x"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(KeyError, match=r"d\.jsonl:2: expected text field 'text', found fields \['body'\]"):
        load_documents(p)
    p.write_text(json.dumps({"text": "ok", "domain": "x"}) + "\n" + json.dumps({"text": "no label"}) + "\n")
    with pytest.raises(KeyError, match=r"d\.jsonl:2: expected label field 'domain', found fields \['text'\]"):
        load_documents(p, label_field="domain")


def test_invalid_json_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{not json\n')
    invalid = r"d\.jsonl:2: expected one JSON object per line, found invalid JSON \(.* at column 2\)"
    with pytest.raises(ValueError, match=invalid):
        load_documents(p)
    p.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: expected one JSON object per line, found a JSON list"):
        load_documents(p)


def test_files_without_text_are_skipped_with_a_warning(tmp_path):
    (tmp_path / "poems.txt").write_text("roses are red\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "kept"}) + "\n")
    with pytest.warns(UserWarning) as caught:
        docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["roses are red\n", "kept"]
    messages = sorted(str(w.message) for w in caught)
    assert messages == [f"{tmp_path / 'empty.txt'} holds no text; skipped",
                        f"{tmp_path / 'rows.jsonl'}: skipped 1 document(s) with no text"]
    with pytest.raises(ValueError, match=r"no text in the data files .*empty\.txt.*every document is empty"), \
            pytest.warns(UserWarning):
        load_documents(tmp_path / "empty.txt")
