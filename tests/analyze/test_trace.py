"""Trace capture on a moekit LM: rows match the model's own routing; Parquet round trip; errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.analyze.metrics.specialization import preferred_tokens
from moekit.analyze.table import Trace
from moekit.analyze.trace import capture, expert_output_absmax
from moekit.models import MoELM
from tests.helpers import tiny_lm

CFG = tiny_lm(vocab_size=50, dim=16, n_layers=3, n_heads=2, n_kv_heads=1, max_seq_len=16, ffn_hidden=32, num_experts=4,
              expert_hidden=8, router_args={"k": 2}, first_k_dense=1)


def batches(n=3, B=2, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        yield torch.randint(0, 50, (B, L), generator=g), {"label": ["even" if i % 2 == 0 else "odd"] * B}


def test_trace_matches_model_routing(tmp_path):
    torch.manual_seed(0)
    model = MoELM(CFG).eval()
    info = capture(model, batches(), tmp_path / "t.parquet", progress=False, record_outputs=True, chunk_rows=50)
    assert info.layers == [1, 2] and info.sequences == 6 and info.tokens == 48
    assert info.rows == 2 * 48 * 2  # layers x tokens x k
    tr = Trace(info.path)
    assert tr.layers == [1, 2] and tr.k == 2 and tr.label_columns == ["label"]
    ids = torch.cat([b[0] for b in batches()])
    with torch.no_grad():
        out = model(ids)
    for layer in (1, 2):
        r = tr.layer(layer)
        routing = out.routings[layer]
        np.testing.assert_array_equal(r.experts, routing.expert_ids.numpy())
        np.testing.assert_allclose(r.weights, routing.weights.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(r.token, ids.reshape(-1).numpy())
    labels = tr.sql("SELECT label, count(*) FROM trace GROUP BY 1 ORDER BY 1").fetchall()
    assert labels == [("even", 128), ("odd", 64)]
    absmax = tr.sql("SELECT min(out_absmax) FROM trace").fetchone()[0]
    assert absmax > 0
    prefs = preferred_tokens(tr, top=2, min_count=1)
    assert set(prefs) == {1, 2} and all(len(v) <= 2 for v in prefs[1].values())


def test_expert_output_absmax_matches_eager():
    torch.manual_seed(0)
    model = MoELM(CFG).eval()
    moe = model.layers[1].mlp
    x = torch.randn(5, 16)
    r = moe.router(x)
    got = expert_output_absmax(moe.experts, x, r)
    ex = moe.experts
    torch.set_grad_enabled(False)
    for t in range(5):
        for s in range(2):
            e = int(r.expert_ids[t, s])
            g, u = (ex.gate_up_proj[e] @ x[t]).split(8)
            y = ex.down_proj[e] @ (torch.nn.functional.silu(g) * u)
            assert float(got[t, s]) == pytest.approx(float(y.abs().max()), rel=1e-5)
    torch.set_grad_enabled(True)


def test_failed_capture_leaves_no_file(tmp_path):
    model = MoELM(CFG)

    def bad():
        yield torch.randint(0, 50, (1, 4)), {"label": ["x"]}
        yield torch.randint(0, 50, (1, 4)), {}  # no label column

    with pytest.raises(ValueError, match="label columns"):
        capture(model, bad(), tmp_path / "t.parquet", progress=False)
    assert not list(tmp_path.iterdir())
    dense = MoELM(tiny_lm(n_layers=1, ffn_hidden=8))
    with pytest.raises(ValueError, match="no moekit MoE layers"):
        capture(dense, batches(), tmp_path / "d.parquet", progress=False)
    with pytest.raises(FileNotFoundError):
        Trace(tmp_path / "missing.parquet")


def test_analysis_of_a_patched_hugging_face_model(tmp_path):
    pytest.importorskip("transformers")
    import json

    import transformers as tf

    from moekit.analyze.run import analyze_model
    from moekit.hf import patch

    cfg = tf.OlmoeConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = patch(tf.AutoModelForCausalLM.from_config(cfg).eval())
    windows = {"a": torch.randint(0, 96, (4, 16)), "b": torch.randint(0, 96, (4, 16))}
    report = analyze_model(
        model, windows, tmp_path / "out", progress=False, forward=lambda m, ids: m(input_ids=ids, use_cache=False)
    )
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["trace"]["layers"] == [0, 1] and metrics["trace"]["num_experts"] == 8 and metrics["trace"]["k"] == 2
    assert sum(metrics["load"]["0"]["counts"]) == 8 * 16 * 2
    assert set(metrics["specialization"]["labels"]) == {"a", "b"}
    assert report.is_file()
    # the trace holds the routing the patched model computes itself
    from moekit.hf import routings

    ids = torch.cat([windows["a"], windows["b"]])
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    r0 = routings(model)[0]
    tr = Trace(tmp_path / "out" / "trace.parquet")
    np.testing.assert_array_equal(tr.layer(0).experts, r0.expert_ids.numpy())


def test_trace_of_mixture_of_depths_blocks_keeps_the_processed_tokens(tmp_path):
    torch.manual_seed(1)
    cfg = CFG.replace(first_k_dense=0, n_layers=4, mod_capacity=0.5)
    model = MoELM(cfg).eval()
    with torch.no_grad():  # make the causal decisions differ between sequences
        model.layers[1].depth_router.weight.mul_(10)
    info = capture(model, batches(), tmp_path / "t.parquet", progress=False, record_outputs=True)
    tr = Trace(info.path)
    ids = torch.cat([b[0] for b in batches()])
    with torch.no_grad():
        out = model(ids)
    sel = out.depth[1].reshape(-1)
    assert 0 < int(sel.sum()) < sel.numel()  # block 1 processed some tokens, not all
    for layer in (0, 1, 2, 3):
        r = tr.layer(layer)
        np.testing.assert_array_equal(r.experts, out.routings[layer].expert_ids.numpy())
        want = ids.reshape(-1) if out.depth[layer] is None else ids.reshape(-1)[out.depth[layer].reshape(-1)]
        np.testing.assert_array_equal(r.token, want.numpy())
    rows = tr.sql("SELECT seq * 8 + pos FROM trace WHERE layer = 1 AND slot = 0 ORDER BY seq, pos").fetchnumpy()
    np.testing.assert_array_equal(next(iter(rows.values())), sel.nonzero().squeeze(-1).numpy())
    labels = tr.sql("SELECT label, count(*) FROM trace WHERE layer = 1 GROUP BY 1 ORDER BY 1").fetchall()
    even = int(out.depth[1][[0, 1, 4, 5]].sum()) * 2  # batches 0 and 2 are "even"; k = 2 rows per token
    assert labels[0] == ("even", even)


def test_trace_of_a_variable_k_router_records_e_and_measured_experts(tmp_path):
    from dataclasses import replace

    from moekit.analyze.report import compute_metrics

    cfg = replace(CFG, num_experts=8, router="topp", router_args={"p": 0.5})
    torch.manual_seed(0)
    model = MoELM(cfg).eval()
    info = capture(model, batches(n=4), tmp_path / "t.parquet", progress=False)
    tr = Trace(info.path)
    ids = torch.cat([b[0] for b in batches(n=4)])
    with torch.no_grad():
        out = model(ids)
    measured = np.mean([float(out.routings[i].active_per_token().float().mean()) for i in (1, 2)])
    assert tr.num_experts == 8 and tr.slots == 8 and tr.variable_k
    assert tr.experts_per_token == pytest.approx(measured) and tr.k == round(measured) < 8
    m = compute_metrics(tr)
    assert m["trace"]["experts_per_token"] == pytest.approx(measured)
    assert m["affinity"]["1->2"]["score"] < 1.0
