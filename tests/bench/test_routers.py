"""The router leaderboard: the smoke budget end to end (library and CLI), and its statistics."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moekit.bench import BUDGETS, ENTRIES, run_leaderboard
from moekit.bench.entries import model_config
from moekit.bench.measure import expert_domain_mi_bits, measure
from moekit.cli.main import app
from moekit.data import reference_data_config
from moekit.models import MoELM, count_params
from moekit.routing import list_routers

# CI trains a representative subset end to end (dense, capacity, null slots, chain, two experts variants);
# test_every_entry_trains_one_step covers the other entries' models without the data pipeline.
SMOKE_SUBSET = ["dense", "topk", "switch", "null_experts", "chain", "smear", "duo", "mixture_of_depths"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaderboard")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEKIT_CACHE", str(root / "cache"))
    res = run_leaderboard("smoke", SMOKE_SUBSET, root / "out", progress=False, log=lambda *_: None)
    yield root, res
    mp.undo()


def test_every_registered_router_is_on_the_leaderboard():
    on_board = {e.router for e in ENTRIES.values()}
    assert set(list_routers()) <= on_board, set(list_routers()) - on_board


def test_entries_have_equal_nominal_active_expert_flops():
    b = BUDGETS["small"]
    F2 = 2 * 3 * b.dim * b.expert_hidden * 2  # two experts of width F per token, per MoE layer
    for name, e in ENTRIES.items():
        cfg = model_config(e, b, b.vocab_size)
        if e.router is None:
            assert cfg.ffn_hidden == 2 * b.expert_hidden
            continue
        k = cfg.router_args.get("k", cfg.router_args.get("eval_k", 2)) * cfg.moe_iterations
        if cfg.experts in ("smear", "film"):
            k = 1  # one merged / shared expert per token
        if name not in ("topp",):
            assert 2 * 3 * cfg.dim * cfg.expert_hidden * k == F2, name
    small = count_params(model_config(ENTRIES["topk"], b, b.vocab_size))
    assert small.total < 5_000_000  # "small" stays a 2-core budget


def test_every_entry_trains_one_step():
    b = BUDGETS["smoke"]
    ids = torch.randint(0, b.vocab_size, (2, b.seq_len))
    for name, e in ENTRIES.items():
        torch.manual_seed(0)
        model = MoELM(model_config(e, b, b.vocab_size))
        out = model(ids, targets=ids)
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        assert math.isfinite(float(loss.detach())), name
        assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0, name


def test_smoke_leaderboard_writes_table_json_and_plots(smoke):
    root, res = smoke
    assert [r["router"] for r in res.rows] == SMOKE_SUBSET
    assert all(f.is_file() and f.stat().st_size > 200 for f in res.files)
    md = (root / "out" / "leaderboard.md").read_text()
    for name in SMOKE_SUBSET:
        assert f"| {name} |" in md
    data = json.loads((root / "out" / "leaderboard.json").read_text())
    assert data["budget"] == "smoke" and data["domains"] == ["bible", "code", "wiki"]
    rows = {r["router"]: r for r in data["rows"]}
    for r in rows.values():
        assert math.isfinite(r["val_loss"]) and set(r["val_loss_per_domain"]) == {"bible", "code", "wiki"}
        assert r["expert_domain_mi_bits"] >= 0 and r["tokens_per_s"] > 0 and r["history"]
    assert rows["dense"]["active_experts"] == 0
    assert rows["topk"]["active_experts"] == pytest.approx(2.0) and rows["topk"]["dropped_frac"] == 0
    assert rows["chain"]["active_experts"] == pytest.approx(2.0)  # 2 iterations of top-1
    assert rows["switch"]["active_experts"] <= 1.0
    assert rows["null_experts"]["active_experts"] < 2.0
    assert rows["duo"]["active_experts"] <= 1.0 and rows["smear"]["active_experts"] == pytest.approx(4.0)
    assert rows["topk"]["load_max_over_mean"] >= 1.0
    # mixture-of-depths: block 1 of 2 is routed; its FLOPs shrink with the share of tokens it processed
    mod = rows["mixture_of_depths"]
    assert list(mod["depth_processed"]) == ["1"] and 0 <= mod["depth_processed"]["1"] <= 1
    if mod["depth_processed"]["1"] < 1:
        assert mod["active_flops_per_token"] < rows["topk"]["active_flops_per_token"]
    assert rows["topk"]["depth_processed"] is None
    # equal nominal compute: dense and top-2 differ only by the router
    assert rows["dense"]["active_flops_per_token"] == pytest.approx(rows["topk"]["active_flops_per_token"], rel=0.05)


def test_cli_reuses_finished_runs_and_rejects_unknown_entries(smoke):
    root, res = smoke
    runner = CliRunner()
    out = runner.invoke(app, ["bench", "routers", "--budget", "smoke", "--routers", "topk,chain",
                              "--out", str(root / "out"), "--no-progress"], env={"MOEKIT_CACHE": str(root / "cache")})
    assert out.exit_code == 0, out.output
    assert "training" not in out.output and "best:" in out.output  # nothing retrained
    again = json.loads((root / "out" / "leaderboard.json").read_text())
    first = {r["router"]: r["val_loss"] for r in res.rows}
    assert {r["router"]: r["val_loss"] for r in again["rows"]} == {k: first[k] for k in ("topk", "chain")}
    other_seed = runner.invoke(app, ["bench", "routers", "--routers", "topk", "--seed", "1", "--out",
                                     str(root / "out"), "--no-progress"], env={"MOEKIT_CACHE": str(root / "cache")})
    assert other_seed.exit_code == 1 and "another model, training or data config" in other_seed.output
    bad = runner.invoke(app, ["bench", "routers", "--routers", "nope", "--out", str(root / "x")])
    assert bad.exit_code == 1 and "known:" in bad.output
    listed = runner.invoke(app, ["bench", "routers", "--list"])
    assert listed.exit_code == 0 and "budget small" in listed.output


def test_mutual_information():
    assert expert_domain_mi_bits(torch.tensor([[5, 5], [5, 5]])) == pytest.approx(0.0)
    assert expert_domain_mi_bits(torch.tensor([[7, 0, 0], [0, 7, 0], [0, 0, 7]])) == pytest.approx(math.log2(3))
    # [domains, E] counts: I = H(domain) - H(domain | expert) = 1 - 1/2 (expert 1, half the slots, sees both)
    assert expert_domain_mi_bits(torch.tensor([[4, 4, 0], [0, 4, 4]])) == pytest.approx(0.5)


def test_measure_asks_each_experts_variant_for_its_flops():
    """The routed-expert FLOPs are the variant's own `flops_per_token`, summed over MoE layers, from the loads the
    routings measured (here Duo-LLM: a big expert of width 2F, a small one of width F/2 as in the leaderboard)."""
    b = BUDGETS["smoke"]
    cfg = model_config(ENTRIES["duo"], b, b.vocab_size)
    model = MoELM(cfg)
    x = torch.randint(0, b.vocab_size, (3, b.seq_len))
    m = measure(model, {"a": (x[:2], x[:2]), "b": (x[2:], x[2:])}, batch_size=2)
    model.eval()
    with torch.no_grad():
        routings = [r for r in model(x).routings if r is not None]
    T = x.numel()
    small = max(1, cfg.expert_hidden // 4)
    expected = 0.0
    for r in routings:
        load = r.tokens_per_expert().double()  # [2]: slots of the big and of the small expert
        expected += 2 * 3 * cfg.dim * float(cfg.expert_hidden * load[0] + small * load[1]) / T
    assert len(routings) == cfg.n_layers and m.expert_flops_per_token == pytest.approx(expected, rel=1e-12)


def test_an_interrupted_run_stops_the_leaderboard(smoke, monkeypatch):
    """Ctrl-C/SIGTERM ends a run early with a checkpoint; the leaderboard stops rather than rank the half run."""
    import types

    import moekit.train.reuse as reuse_mod

    root, _ = smoke
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[4])
        return types.SimpleNamespace(interrupted=True)

    monkeypatch.setenv("MOEKIT_CACHE", str(root / "cache"))
    monkeypatch.setattr(reuse_mod, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_leaderboard("smoke", ["dense", "topk"], root / "other", progress=False, log=lambda *_: None)
    assert calls == [root / "other" / "runs" / "dense"] and not (root / "other" / "leaderboard.md").exists()


def test_device_and_dtype_flags(smoke, tmp_path):
    """--device cpu is the default run (finished runs reused, the same numbers); a CUDA device this machine lacks
    is one line before anything is written; the benchmark script refuses it the same way."""
    import subprocess
    import sys
    from pathlib import Path

    root, res = smoke
    runner = CliRunner()
    env = {"MOEKIT_CACHE": str(root / "cache")}
    out = runner.invoke(app, ["bench", "routers", "--budget", "smoke", "--routers", "topk", "--device", "cpu",
                              "--dtype", "float32", "--out", str(root / "out"), "--no-progress"], env=env)
    assert out.exit_code == 0, out.output
    assert "training" not in out.output  # the default's finished run is the --device cpu run
    rows = json.loads((root / "out" / "leaderboard.json").read_text())["rows"]
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in res.rows if r["router"] == "topk"]
    assert rows[0]["trained_on"] == "cpu" and rows[0]["dtype"] == "float32"
    if not torch.cuda.is_available():
        cuda = runner.invoke(app, ["bench", "routers", "--routers", "topk", "--device", "cuda", "--out",
                                   str(tmp_path / "gpu"), "--no-progress"], env=env)
        assert cuda.exit_code == 1 and cuda.output.count("\n") == 1, cuda.output
        assert cuda.output.startswith("error:") and "CUDA is not available" in cuda.output
        assert not (tmp_path / "gpu").exists()
        script = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_vs_dense.py"
        p = subprocess.run([sys.executable, str(script), "--device", "cuda", "--out", str(tmp_path / "m.json")],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and p.stderr.startswith("error:") and "CUDA is not available" in p.stderr
        assert not (tmp_path / "m.json").exists()
    bf16 = runner.invoke(app, ["bench", "routers", "--routers", "topk", "--dtype", "bfloat16", "--out",
                               str(tmp_path / "bf"), "--no-progress"], env=env)
    assert bf16.exit_code == 1 and "--bf16-on-cpu" in bf16.output and not (tmp_path / "bf").exists()


def test_reuse_ignores_the_device_but_not_the_dtype():
    """A finished run serves any device (same float32 math); a bfloat16 request does not reuse a float32 run."""
    from moekit.train.config import TrainConfig
    from moekit.train.reuse import same_run

    old = TrainConfig.short_run(10, seed=0).to_dict()
    del old["device"], old["dtype"], old["bf16_on_cpu"]  # a run saved before these fields existed
    assert same_run(old, TrainConfig.short_run(10, seed=0))
    assert same_run(old, TrainConfig.short_run(10, seed=0, device="cuda"))
    assert same_run(old, TrainConfig.short_run(10, seed=0, device="auto", bf16_on_cpu=True))
    assert not same_run(old, TrainConfig.short_run(10, seed=0, dtype="bfloat16", bf16_on_cpu=True))
    bf = TrainConfig.short_run(10, seed=0, device="cuda", dtype="bfloat16").to_dict()
    assert same_run(bf, TrainConfig.short_run(10, seed=0, device="cpu", dtype="bfloat16", bf16_on_cpu=True))
    assert not same_run(bf, TrainConfig.short_run(10, seed=0))
    assert not same_run(old, TrainConfig.short_run(10, seed=1, device="cuda"))


def test_a_dtype_change_refuses_the_finished_run(smoke):
    """The leaderboard names the clash instead of reusing (or resuming) a float32 run in bfloat16."""
    root, _ = smoke
    with pytest.raises(FileExistsError, match="dtype"):
        run_leaderboard("smoke", ["topk"], root / "out", dtype="bfloat16", bf16_on_cpu=True, progress=False,
                        log=lambda *_: None)


def test_budget_data_names_the_corpus():
    medium = BUDGETS["medium"]
    assert medium.data == "reference"
    assert medium.data_config(0) == reference_data_config(0)  # the reference models' data, cached once
    small = BUDGETS["small"]
    cfg = small.data_config(3)
    assert (cfg.vocab_size, cfg.max_chars_per_domain, cfg.seed) == (small.vocab_size, small.max_chars_per_domain, 3)
    with pytest.raises(ValueError, match="Budget.data must be 'builtin' or 'reference'"):
        dataclasses.replace(small, data="wiki")
    with pytest.raises(ValueError, match="Budget.vocab_size must be 2048"):
        dataclasses.replace(small, data="reference")
