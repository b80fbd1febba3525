"""Corrupt, truncated or wrong files fail with a ValueError that names the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moekit.utils.readers import check_safetensors, load_safetensors, load_torch_state, read_json_object


def test_read_json_object(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"a": 1}')
    assert read_json_object(f) == {"a": 1}
    for text, found in (("{oops", "invalid JSON"), ("[1]", "a JSON list"), ("3", "a JSON int")):
        f.write_text(text)
        with pytest.raises(ValueError, match=rf"config\.json: expected a JSON object, found {found}"):
            read_json_object(f)
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_json_object(f)
    with pytest.raises(FileNotFoundError):
        read_json_object(tmp_path / "missing.json")


def test_safetensors_truncated_or_garbage(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(100.0)}, str(f))
    assert check_safetensors(f) == ["w"] and torch.equal(load_safetensors(f)["w"], torch.arange(100.0))
    data = f.read_bytes()
    for broken in (data[:-40], data[:10], b"nonsense"):
        f.write_bytes(broken)
        for read in (check_safetensors, load_safetensors):
            with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
                read(f)


def test_torch_state_truncated(tmp_path):
    f = tmp_path / "trainer_state.pt"
    torch.save({"step": 3, "t": torch.ones(2)}, f)
    assert load_torch_state(f)["step"] == 3
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"trainer_state\.pt: not a readable torch state file"):
        load_torch_state(f)
