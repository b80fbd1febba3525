"""Reference models at the smoke budget: build, reuse, resume after an interruption, refuse another config,
load, export, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import moekit.train.reuse as ref_build  # where the reference builds call train()
from moekit.cli.main import app
from moekit.models import MoELM
from moekit.models.presets import preset
from moekit.ref import BUDGETS, build, built, export_hf, load, load_tokenizer, model_config, run_dir
from moekit.train.checkpoint import CKPT, load_model, read_meta

NAMES = ["ref-dense", "ref-moe"]
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding ref-dense and ref-moe built at the smoke budget (seed 0)."""
    root = tmp_path_factory.mktemp("refcache")
    rows = build(NAMES, "smoke", 0, cache_dir=root, out=root / "published", **QUIET)
    return root, rows


def test_presets_match_active_ffn_width_and_total_params():
    d, d4, moe, fg = (preset(n) for n in ("ref-dense", "ref-dense-4x", "ref-moe", "ref-moe-fg"))
    k = moe.router_args["k"]
    assert k * moe.expert_hidden == d.ffn_hidden  # equal active FFN width
    assert moe.num_experts * moe.expert_hidden == d4.ffn_hidden  # equal total FFN width
    assert fg.router_args["k"] * fg.expert_hidden + fg.num_shared_experts * fg.expert_hidden == d.ffn_hidden
    for cfg in (moe, fg):  # routed weights sum to k: the same output scale as the dense FFN at init
        assert cfg.router_args["routed_scale"] == cfg.router_args["k"]
        MoELM(dataclasses.replace(cfg, vocab_size=64, n_layers=1))  # the topk router accepts these arguments


def test_build_writes_results(cache):
    root, rows = cache
    b = BUDGETS["smoke"]
    assert [r["model"] for r in rows] == NAMES
    for r in rows:
        assert r["steps"] == b.steps and r["tokens"] == b.steps * b.batch_size * b.seq_len
        assert set(r["val_loss_per_domain"]) == {"bible", "code", "wiki"}
        assert [h["step"] for h in r["history"]] == list(range(b.eval_every, b.steps + 1, b.eval_every))
    dense, moe = rows
    assert moe["params_total"] > 2 * dense["params_total"] > 2 * moe["params_active"] * 0.9
    saved = json.loads((root / "ref" / "smoke" / "results.json").read_text())
    assert [(r["model"], r["seed"]) for r in saved["rows"]] == [("ref-dense", 0), ("ref-moe", 0)]
    assert saved["rows"][1]["val_loss"] == pytest.approx(moe["val_loss"])
    md = (root / "ref" / "smoke" / "results.md").read_text()
    assert "| ref-moe |" in md and "| ref-dense |" in md
    assert (root / "published" / "results.md").read_text() == md


def test_second_build_reuses(cache):
    root, rows = cache
    ckpt = run_dir("ref-moe", "smoke", 0, root) / CKPT / "model.safetensors"
    mtime = ckpt.stat().st_mtime_ns
    lines = []
    again = build(["ref-moe"], "smoke", 0, cache_dir=root, progress=False, log=lines.append)
    assert ckpt.stat().st_mtime_ns == mtime
    assert len(lines) == 1 and "reused" in lines[0]
    assert again[0]["val_loss"] == rows[1]["val_loss"]
    saved = json.loads((root / "ref" / "smoke" / "results.json").read_text())  # the other model's row stays
    assert {r["model"] for r in saved["rows"]} == set(NAMES)


def test_interrupted_build_resumes_to_the_uninterrupted_result(cache, tmp_path, monkeypatch):
    root, rows = cache
    copy = shutil.copytree(root, tmp_path / "cache")
    shutil.rmtree(run_dir("ref-moe", "smoke", 0, copy))
    real_train = ref_build.train

    def interrupt_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(ref_build, "train", lambda *a, **k: real_train(*a, **k, on_step=interrupt_at_4))
    with pytest.raises(KeyboardInterrupt):
        build(["ref-moe"], "smoke", 0, cache_dir=copy, **QUIET)
    assert [(r["model"], r["status"], r["step"]) for r in built(copy) if r["model"] == "ref-moe"] == [
        ("ref-moe", "partial", 4)
    ]
    with pytest.raises(FileNotFoundError, match="only trained to step 4 of 6"):
        load("ref-moe", "smoke", 0, copy)
    monkeypatch.setattr(ref_build, "train", real_train)
    lines = []
    resumed = build(["ref-moe"], "smoke", 0, cache_dir=copy, progress=False, log=lines.append)
    assert "resuming from step 4" in lines[0]
    assert resumed[0]["val_loss"] == rows[1]["val_loss"]  # resuming is exact
    a, b = load("ref-moe", "smoke", 0, copy), load("ref-moe", "smoke", 0, root)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


def test_a_folder_holding_another_config_is_refused(cache, tmp_path, monkeypatch):
    root, _ = cache
    copy = shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setitem(BUDGETS, "smoke", dataclasses.replace(BUDGETS["smoke"], lr=1e-3))
    with pytest.raises(FileExistsError, match="another model, training or data config"):
        build(["ref-dense"], "smoke", 0, cache_dir=copy, **QUIET)
    assert read_meta(run_dir("ref-dense", "smoke", 0, copy))["train"]["lr"] == 3e-3  # left as it was


def test_load_gives_the_checkpoints_model_in_eval_mode(cache):
    root, rows = cache
    model = load("ref-moe", "smoke", 0, root)
    assert not model.training
    ref = load_model(run_dir("ref-moe", "smoke", 0, root)).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)
    assert model.config == model_config("ref-moe", "smoke", load_tokenizer("ref-moe", "smoke", 0, root).vocab_size)


def test_missing_model_names_the_build_command(cache):
    root, _ = cache
    with pytest.raises(FileNotFoundError, match=r"moekit ref build --budget smoke --models ref-moe-fg --seed 0`"):
        load("ref-moe-fg", "smoke", 0, root)
    with pytest.raises(ValueError, match="unknown reference model 'nope'"):
        load("nope", "smoke", 0, root)
    with pytest.raises(ValueError, match="unknown reference budget 'huge'"):
        load("ref-moe", "huge", 0, root)


def test_export_to_mixtral_folds_routed_scale(cache, tmp_path):
    root, _ = cache
    assert load("ref-moe", "smoke", 0, root).config.router_args["routed_scale"] == 2.0
    pytest.importorskip("transformers")
    out = export_hf("ref-moe", tmp_path / "hf", "smoke", 0, root)  # the export checks HF logits itself
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="dense model"):
        export_hf("ref-dense", tmp_path / "hf2", "smoke", 0, root)


def test_cli_build_list_and_errors(cache, tmp_path, monkeypatch):
    root, _ = cache
    copy = shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setenv("MOEKIT_CACHE", str(copy))
    runner = CliRunner()
    r = runner.invoke(app, ["ref", "build", "--budget", "smoke", "--models", "ref-dense", "--out", str(tmp_path / "o"),
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "reused" in r.output and (tmp_path / "o" / "results.json").is_file()
    r = runner.invoke(app, ["ref", "list"])
    assert r.exit_code == 0 and "ref-moe" in r.output and "done" in r.output
    r = runner.invoke(app, ["ref", "build", "--budget", "smoke", "--models", "ref-moe,bogus"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        "error: unknown reference model 'bogus'; known: ref-dense, ref-dense-4x, ref-moe, ref-moe-fg"
    ]
    r = runner.invoke(app, ["ref", "export", "ref-moe-fg", "--to", str(tmp_path / "x"), "--budget", "smoke"])
    assert r.exit_code == 1 and r.output.startswith("error: reference model ref-moe-fg")
    assert "moekit ref build" in r.output


def _benchmark():
    return _script("moe_vs_dense")


def test_moe_vs_dense_compare_seed_by_hand():
    bench = _benchmark()
    hist = lambda *losses: [{"step": 10 * (i + 1), "loss": v} for i, v in enumerate(losses)]  # noqa: E731
    rows = {"ref-dense": {"history": hist(5.0, 4.0)}, "ref-dense-4x": {"history": hist(4.8, 3.6)},
            "ref-moe": {"history": hist(4.5, 3.7)}}
    s = bench.compare_seed(rows, 20)
    assert s["moe_steps_to_dense_final"] == pytest.approx(10 + 10 * 0.5 / 0.8)  # 4.5 -> 3.7 crosses 4.0 at 5/8
    assert s["ratio"] == pytest.approx(16.25 / 20)
    assert s["gain_fraction"] == pytest.approx(0.3 / 0.4)
    rows["ref-dense-4x"] = {"history": hist(5.0, 4.1)}  # no gain to realise: not a fraction
    assert bench.compare_seed(rows, 20)["gain_fraction"] is None
    del rows["ref-dense-4x"]  # --built-only before the 4x model is built: the step ratio alone
    s = bench.compare_seed(rows, 20)
    assert s["dense_4x_final_loss"] is None and s["gain_fraction"] is None and s["ratio"] == pytest.approx(16.25 / 20)
    assert s["fg_final_loss"] is None and s["fg_ratio"] is None
    rows["ref-moe-fg"] = {"history": hist(4.2, 3.5)}  # crosses 4.0 at 10 + 10 * 0.2 / 0.7
    s = bench.compare_seed(rows, 20)
    assert s["fg_final_loss"] == 3.5 and s["fg_ratio"] == pytest.approx((10 + 10 * 0.2 / 0.7) / 20)


def test_moe_vs_dense_ref_path_reuses_reference_models(cache, tmp_path, monkeypatch):
    root, rows = cache
    copy = shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setenv("MOEKIT_CACHE", str(copy))
    mtime = (run_dir("ref-moe", "smoke", 0, copy) / CKPT / "model.safetensors").stat().st_mtime_ns
    payload = _benchmark().compare_ref("smoke", [0], str(tmp_path / "mvd.json"), device="cpu", dtype="float32",
                                       where="cpu")
    assert (run_dir("ref-moe", "smoke", 0, copy) / CKPT / "model.safetensors").stat().st_mtime_ns == mtime
    s = payload["summary"]["0"]
    assert s["moe_final_loss"] == rows[1]["history"][-1]["loss"]
    assert s["dense_final_loss"] == rows[0]["history"][-1]["loss"]
    saved = json.loads((tmp_path / "mvd.json").read_text())
    assert saved["budget"] == "smoke" and saved["seeds"] == [0]
    assert "| 0 |" in (tmp_path / "mvd.md").read_text()


def test_moe_vs_dense_recorded_rows_stand_in_for_models_not_built(cache, tmp_path, monkeypatch):
    root, rows = cache
    bench = _benchmark()
    published = root / "published" / "results.json"
    copy = shutil.copytree(root, tmp_path / "cache")
    shutil.rmtree(run_dir("ref-dense", "smoke", 0, copy))  # this machine lacks the dense model
    monkeypatch.setenv("MOEKIT_CACHE", str(copy))
    recorded = bench.recorded_rows(published, "smoke")
    assert set(recorded) == {("ref-dense", 0), ("ref-moe", 0)}
    payload = bench.compare_ref("smoke", [0], str(tmp_path / "mvd.json"), device="cpu", dtype="float32",
                                where="cpu", built_only=True, recorded=recorded)
    assert not run_dir("ref-dense", "smoke", 0, copy).exists()  # nothing retrained
    s = payload["summary"]["0"]
    assert s["dense_final_loss"] == rows[0]["history"][-1]["loss"] and s["fg_final_loss"] is None
    assert payload["runs"]["0"]["ref-dense"]["recorded"] == str(published)
    assert "recorded" not in payload["runs"]["0"]["ref-moe"]  # the built one is measured here
    assert "Recorded rows" in (tmp_path / "mvd.md").read_text()
    info = json.loads(published.read_text())
    info["budget"]["steps"] += 1  # made under other settings: refused
    (tmp_path / "other.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="other settings of budget 'smoke'"):
        bench.recorded_rows(tmp_path / "other.json", "smoke")
    info = json.loads(published.read_text())
    info["rows"][0]["params_total"] += 1  # the preset changed since
    (tmp_path / "stale.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="the preset changed since"):
        bench.recorded_rows(tmp_path / "stale.json", "smoke")


def test_per_model_training_overrides_and_reference_data():
    from moekit.ref.budgets import RefBudget, ref_data_config, train_config

    b = dataclasses.replace(BUDGETS["smoke"], train_overrides={"ref-moe": {"lr": 1e-2}})
    assert train_config(b, 0, model="ref-moe").lr == 1e-2
    assert train_config(b, 0, model="ref-dense").lr == train_config(b, 0).lr == b.lr
    with pytest.raises(ValueError, match="unknown models \\['nope'\\]"):
        RefBudget(name="x", steps=2, batch_size=1, seq_len=8, lr=1e-3, warmup=0, eval_every=1, eval_windows=1,
                  ckpt_every=1, train_overrides={"nope": {"lr": 1e-3}})
    from moekit.data import reference_data_config

    assert ref_data_config("ref", seed=3) == reference_data_config(seed=0)  # every model seed: the same corpus


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compress_benchmark_unigram_by_hand_and_smoke_run(cache, tmp_path, monkeypatch):
    bench = _script("compress")
    train = np.array([0, 0, 1, 2])  # counts + 1: [3, 2, 2, 1] of 8
    y = torch.tensor([[0, 3]])
    u = bench.unigram_loss(train, {"a": (y, y)}, vocab=4)
    assert u["a"] == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2) and u["all"] == pytest.approx(u["a"])
    root, _ = cache
    monkeypatch.setenv("MOEKIT_CACHE", str(root))
    monkeypatch.setattr("sys.argv", ["compress.py", "--budget", "smoke", "--methods", "frequency,mcsmoe,svd",
                                     "--ratios", "0.25", "--calib-seeds", "0,1", "--calib-batches", "2", "--quant", "8",
                                     "--threads", "1", "--out", str(tmp_path / "c")])
    bench.main()
    rows = json.loads((tmp_path / "c" / "compress.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "frequency", "mcsmoe", "svd", "int8 experts"]
    assert rows[1]["params"] < rows[0]["params"] and rows[4]["expert_bytes"] < rows[0]["expert_bytes"] / 3
    assert rows[2]["params"] == rows[1]["params"] and len(rows[2]["loss_per_seed"]) == 2
    assert len(rows[3]["loss_per_seed"]) == 1 and rows[3]["expert_bytes"] <= 0.75 * rows[0]["expert_bytes"]
    assert len(rows[1]["loss_per_seed"]) == 2 and "| frequency | 25% |" in (tmp_path / "c" / "compress.md").read_text()
