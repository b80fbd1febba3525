"""`moekit convert btx|prompts|nexus` on real runs: branches made by `moekit train --init SEED` on one domain each."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.train.checkpoint import load_model, read_meta
from tests.convert.conftest import SMALL


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def branches(_dense_run, tmp_path_factory):
    """Two 1-step branches of the session's dense run, on wiki and on code (the seed's tokenizer)."""
    root = tmp_path_factory.mktemp("branches")
    out = []
    for domain in ("wiki", "code"):
        b = root / domain
        r = invoke("train", "--init", _dense_run, "--out", b, "--steps", "1", "--seq-len", "16", "--batch-size", "4",
                   "--set", f'domains=["{domain}"]', "--set", f"tokenizer={_dense_run / 'tokenizer.json'}", *SMALL)
        assert r.exit_code == 0, r.output
        out.append(b)
    return out


def test_btx_writes_a_run_that_train_init_continues(_dense_run, branches, tmp_path):
    dst = tmp_path / "btx"
    r = invoke("convert", "btx", *branches, "--out", dst, "--k", "1")
    assert r.exit_code == 0, r.output
    assert "experts per MoE block 2 of width 64, top-1" in r.output
    moe, wiki = load_model(dst), load_model(branches[0])
    assert torch.equal(moe.layers[0].mlp.experts.down_proj[0], wiki.layers[0].mlp.down_proj.weight)
    meta = read_meta(dst)
    assert meta["convert"][-1]["method"] == "btx" and meta["data"] == read_meta(_dense_run)["data"]  # the seed's
    assert (dst / "tokenizer.json").is_file()
    cont = tmp_path / "cont"
    r = invoke("train", "--init", dst, "--out", cont, "--steps", "1", "--seq-len", "16", "--batch-size", "4", *SMALL)
    assert r.exit_code == 0, r.output
    bad = invoke("convert", "btx", _dense_run, branches[0], "--out", tmp_path / "bad")
    assert bad.exit_code == 1 and "must be trained from one seed" in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["btx", "cont"]


def test_prompts_and_nexus_from_the_cli(_dense_run, branches, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([["The history of the city"], ["def main():\n    return 0"]]))
    r = invoke("convert", "prompts", _dense_run, *branches, "--out", tmp_path / "p", "--prompts", prompts, "--k", "1")
    assert r.exit_code == 0, r.output
    rows = load_model(tmp_path / "p").layers[0].mlp.router.weight
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(2))
    r = invoke("convert", "nexus", _dense_run, *branches, "--out", tmp_path / "n", "--calib-batches", "1")
    assert r.exit_code == 0, r.output
    moe = load_model(tmp_path / "n")
    assert moe.config.router == "nexus" and moe.config.num_shared_experts == 1
    d = moe.layers[0].mlp.router.domain_embeddings
    assert d.shape == (2, moe.config.dim) and not torch.allclose(d[0], d[1])
    bad = invoke("convert", "prompts", _dense_run, *branches, "--out", tmp_path / "x")
    assert bad.exit_code == 1 and "give --prompts FILE" in bad.output
    assert not (tmp_path / "x").exists()
