"""Training devices and dtypes: TrainConfig.device / dtype / bf16_on_cpu, resolved once per run."""

from __future__ import annotations

import pytest
import torch

from moekit.train import TrainConfig, load_model, read_meta
from moekit.train.checkpoint import load_trainer_state
from moekit.train.device import autocast, resolve_device, to_cpu
from tests.train.test_trainer import run, weights


def test_train_config_round_trip_and_bad_values():
    cfg = TrainConfig(device="cuda:1", dtype="bfloat16", bf16_on_cpu=True)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().device == "cpu" and TrainConfig().dtype == "float32"  # defaults: as before
    for field, bad in [("device", "gpu"), ("device", "cuda:x"), ("device", "cuda:"), ("dtype", "float16"),
                       ("dtype", "bf16"), ("bf16_on_cpu", "yes")]:
        with pytest.raises(ValueError, match=f"TrainConfig.{field} must be"):
            TrainConfig(**{field: bad})


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"device '{name}' requested but CUDA is not available"):
            resolve_device(name)
    with pytest.raises(ValueError, match="bfloat16' on CPU is refused.*--bf16-on-cpu"):
        resolve_device("cpu", "bfloat16")
    with pytest.raises(ValueError, match="bfloat16' on CPU is refused"):
        resolve_device("auto", "bfloat16")
    assert resolve_device("cpu", "bfloat16", bf16_on_cpu=True) == torch.device("cpu")
    assert isinstance(autocast(torch.device("cpu"), "bfloat16"), torch.autocast)


def test_to_cpu_keeps_cpu_tensors_and_structure():
    t = torch.ones(2)
    out = to_cpu({"a": [t, (t, 3)], "b": "x"})
    assert out["a"][0] is t and out["a"][1][0] is t and out["a"][1][1] == 3 and out["b"] == "x"


def test_explicit_cpu_equals_default_and_checkpoint_is_on_cpu(tmp_path):
    run(tmp_path / "default", 4)
    run(tmp_path / "cpu", 4, device="cpu")
    a, b = weights(tmp_path / "default"), weights(tmp_path / "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)
    st = load_trainer_state(tmp_path / "cpu")
    assert "cuda_rng" not in st
    assert all(v.device.type == "cpu" for s in st["optimizer"]["state"].values() for v in s.values())
    assert read_meta(tmp_path / "cpu")["train"]["device"] == "cpu"


def test_bf16_autocast_on_cpu_when_forced(tmp_path):
    with pytest.raises(ValueError, match="bfloat16' on CPU is refused"):
        run(tmp_path / "refused", 2, dtype="bfloat16")
    assert not (tmp_path / "refused" / "checkpoint").exists()
    f32 = run(tmp_path / "f32", 2)
    bf16 = run(tmp_path / "bf16", 2, dtype="bfloat16", bf16_on_cpu=True)
    # the forward ran in bfloat16: a different but close loss; the weights stay float32
    assert f32.train_log[0]["loss"] != bf16.train_log[0]["loss"]
    assert abs(f32.train_log[0]["loss"] - bf16.train_log[0]["loss"]) < 0.05
    assert all(v.dtype == torch.float32 for v in load_model(tmp_path / "bf16").state_dict().values())


def test_resume_may_change_device_but_not_dtype(tmp_path):
    run(tmp_path / "full", 6)
    run(tmp_path / "split", 6, stop_after=3)
    with pytest.raises(ValueError, match="dtype"):
        run(tmp_path / "split", 6, resume=True, dtype="bfloat16", bf16_on_cpu=True)
    run(tmp_path / "split", 6, resume=True, device="auto" if not torch.cuda.is_available() else "cpu")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_without_device_fields_resumes(tmp_path):
    """A run saved before TrainConfig had device/dtype/bf16_on_cpu continues."""
    import json

    run(tmp_path / "old", 4, stop_after=2)
    f = tmp_path / "old" / "checkpoint" / "config.json"
    meta = json.loads(f.read_text())
    for k in ("device", "dtype", "bf16_on_cpu"):
        del meta["train"][k]
    f.write_text(json.dumps(meta))
    assert run(tmp_path / "old", 4, resume=True).step == 4


def test_checkpoint_without_a_newer_model_field_resumes(tmp_path):
    """A run saved before LMConfig had num_experts_per_layer continues (the field takes its default), and a real
    difference is still refused, named."""
    import json

    run(tmp_path / "old", 4, stop_after=2)
    f = tmp_path / "old" / "checkpoint" / "config.json"
    meta = json.loads(f.read_text())
    assert meta["model"].pop("num_experts_per_layer") is None
    f.write_text(json.dumps(meta))
    assert run(tmp_path / "old", 4, resume=True).step == 4
    run(tmp_path / "other", 4, stop_after=2)
    meta = json.loads((tmp_path / "other" / "checkpoint" / "config.json").read_text())
    meta["model"]["n_layers"] += 1
    (tmp_path / "other" / "checkpoint" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="n_layers: checkpoint"):
        run(tmp_path / "other", 4, resume=True)
