"""prepare_data end to end on small corpora: the cache, the datasets' windows, and bad input writing nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moekit.data import DataConfig, prepare_data
from moekit.data.cache import atomic_dir


@pytest.fixture
def prepared(jsonl_files, tmp_path):
    return prepare_data(jsonl_files, label_field="domain", vocab_size=300, val_fraction=0.25, progress=False)


def test_builds_into_env_cache_then_reuses(prepared, tmp_path, jsonl_files):
    assert prepared.directory.parent == tmp_path / "cache" / "data"
    assert prepared.label_names == ["low", "num"]
    meta = json.loads((prepared.directory / "meta.json").read_text())
    assert meta["counts"]["train"]["documents"] == 18 and meta["counts"]["val"]["documents"] == 6
    mtime = (prepared.directory / "train" / "tokens.npy").stat().st_mtime_ns
    again = prepare_data(jsonl_files, label_field="domain", vocab_size=300, val_fraction=0.25, progress=False)
    assert again.directory == prepared.directory
    assert (again.directory / "train" / "tokens.npy").stat().st_mtime_ns == mtime
    assert not [p for p in prepared.directory.parent.iterdir() if p.name.startswith(".")]  # no temporaries
    other = prepare_data(jsonl_files, label_field="domain", vocab_size=310, val_fraction=0.25, progress=False)
    assert other.directory != prepared.directory and other.vocab_size == 310


def test_tokens_are_documents_separated_by_eos(prepared):
    ds = prepared.val
    assert ds.tokens.dtype == np.uint16 and isinstance(ds.tokens, np.memmap)
    eos = prepared.eos_id
    for n in range(ds.num_documents):
        ids = ds.tokens[ds.doc_offsets[n] : ds.doc_offsets[n + 1]].tolist()
        assert ids[-1] == eos and eos not in ids[:-1]
        text = prepared.tokenizer.decode(ids[:-1])
        expected = {"low": set("abcdefghijklmnopqrstuvwxyz "), "num": set("0123456789 ")}
        assert set(text) <= expected[prepared.label_names[ds.doc_labels[n]]]


def test_sample_batch_shapes_shift_and_labels(prepared):
    g = torch.Generator().manual_seed(0)
    x, y, labels = prepared.train.sample_batch(32, 16, g)
    assert x.shape == y.shape == (32, 16) and labels.shape == (32,)
    assert x.dtype == y.dtype == labels.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert set(labels.tolist()) == {0, 1}
    for row, lab in zip(x, labels, strict=True):  # a window lies inside its label's segment
        text = prepared.tokenizer.decode(row.tolist(), skip_special_tokens=True)
        assert any(c.isdigit() for c in text) == (prepared.label_names[lab] == "num")
    x2, _, labels2 = prepared.train.sample_batch(32, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(labels, labels2)


def test_val_windows_fixed_stride_and_cap(prepared):
    w = prepared.val.val_windows(16)
    assert list(w) == ["low", "num"]
    for name, t in w.items():
        start, end = prepared.val.segments[prepared.label_names.index(name)]
        assert t.shape == ((end - start - 1) // 16, 17)
        assert torch.equal(t[1:, 0], t[:-1, -1])  # stride L: each token is a target exactly once
    capped = prepared.val.val_windows(16, max_windows_per_label=5)
    assert all(t.shape == (5, 17) for t in capped.values())
    assert torch.equal(capped["low"][0], w["low"][0]) and torch.equal(capped["low"][-1], w["low"][-1])
    assert all(torch.equal(capped[k], prepared.val.val_windows(16, 5)[k]) for k in capped)
    batches = list(prepared.val.val_batches(16, batch_size=2, max_windows_per_label=5))
    assert [b[0] for b in batches] == ["low"] * 3 + ["num"] * 3
    assert torch.equal(torch.cat([b[1] for b in batches[:3]]), capped["low"][:, :-1])


def test_window_longer_than_data_fails_clearly(prepared):
    with pytest.raises(ValueError, match=r"no window of 100001 tokens fits"):
        prepared.val.sample_batch(2, 100_000)


def test_missing_data_path_fails_and_writes_nothing(tmp_path, jsonl_files):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"data path .*missing\.jsonl does not exist"):
        prepare_data([jsonl_files[0], tmp_path / "missing.jsonl"], vocab_size=300, progress=False)
    assert not cache.exists()


def test_bad_record_fails_and_writes_nothing(tmp_path, jsonl_files):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "domain": "a"}\n{"txt": "typo", "domain": "a"}\n')
    with pytest.raises(KeyError, match=r"bad\.jsonl:2: expected text field 'text'"):
        prepare_data([jsonl_files[0], bad], label_field="domain", vocab_size=300, progress=False)
    assert not (tmp_path / "cache").exists()


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), found 0"):
        DataConfig(val_fraction=0)
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 257"):
        prepare_data("builtin", vocab_size=10, progress=False)


def test_interrupted_build_leaves_no_entry(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "half.npy").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_builtin_small(tmp_path):
    data = prepare_data(
        "builtin", max_chars_per_domain=20_000, vocab_size=512, cache_dir=tmp_path / "c", progress=False
    )
    assert data.label_names == ["bible", "code", "wiki"]
    assert data.directory.parent == tmp_path / "c" / "data"
    windows = data.val.val_windows(32, max_windows_per_label=4)
    assert {k: tuple(v.shape) for k, v in windows.items()} == {k: (4, 33) for k in data.label_names}
    # tokenizer trained on the train split, reused by reference
    again = prepare_data(
        DataConfig(max_chars_per_domain=20_000, tokenizer=str(data.directory / "tokenizer.json")),
        cache_dir=tmp_path / "c",
        progress=False,
    )
    assert again.directory != data.directory
    assert np.array_equal(np.asarray(again.train.tokens), np.asarray(data.train.tokens))


def test_key_follows_file_identity_not_spelling(prepared, jsonl_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = prepare_data(
        [p.name for p in jsonl_files], label_field="domain", vocab_size=300, val_fraction=0.25, progress=False
    )
    assert relative.directory == prepared.directory
    with open(jsonl_files[0], "a") as f:  # edited data -> a new entry
        f.write(json.dumps({"text": "one more low document", "domain": "low"}) + "\n")
    edited = prepare_data(jsonl_files, label_field="domain", vocab_size=300, val_fraction=0.25, progress=False)
    assert edited.directory != prepared.directory
    assert edited.train.num_documents + edited.val.num_documents == 25


def test_config_stores_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.json").write_text("{}")
    cfg = DataConfig(spec=["a.txt", "sub/../b.jsonl"], tokenizer="t.json")
    assert cfg.spec == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    assert cfg.tokenizer == str(tmp_path / "t.json")
    assert DataConfig(spec="a.txt").spec == [str(tmp_path / "a.txt")] and DataConfig().spec == "builtin"
    assert DataConfig(**{**cfg.__dict__}) == cfg  # a config read back from a run is unchanged


def test_skipped_files_warn_on_build_and_on_reuse(tmp_path, jsonl_files):
    (tmp_path / "empty.txt").write_text("")
    files = [*jsonl_files, tmp_path / "empty.txt"]
    for _ in range(2):  # the second call opens the cached entry
        with pytest.warns(UserWarning, match=r"empty\.txt holds no text; skipped"):
            data = prepare_data(files, label_field="domain", vocab_size=300, val_fraction=0.25, progress=False)
        assert data.label_names == ["low", "num"]
