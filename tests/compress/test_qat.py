"""Quantization-aware experts: the quantizers by hand, a forward with exactly the quantized weights, the
straight-through gradient, materialize, and the fine-tuning run."""

from __future__ import annotations

import pytest
import torch

from moekit.compress.finetune import FinetuneConfig
from moekit.compress.qat import materialize, post_training_quantize, qat_config, qat_run, to_qat
from moekit.layers.experts import Experts
from moekit.layers.qat import QATExperts, binarize, ternarize
from moekit.models import MoELM
from moekit.routing import build_router
from tests.helpers import tiny_lm


def test_ternary_threshold_by_hand():
    w = torch.tensor([[0.1, -0.5, 0.9, -0.05], [0.0, 0.0, 0.0, 0.0], [0.3, -0.3, 0.3, -0.3]])
    # row 0: mean |w| = 0.3875, delta = 0.27125: -0.5 and 0.9 kept, alpha = (0.5 + 0.9) / 2 = 0.7
    want = torch.tensor([[0.0, -0.7, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0], [0.3, -0.3, 0.3, -0.3]])
    torch.testing.assert_close(ternarize(w), want)
    # delta = 0.7 x mean: an entry just below it is zeroed, just above kept
    row = torch.tensor([[1.0, 1.0, 1.0, 0.6]])  # mean 0.9, delta 0.63: 0.6 dropped; alpha 1
    torch.testing.assert_close(ternarize(row), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_binary_by_hand():
    w = torch.tensor([[0.5, -1.5, 0.0, 1.0]])  # alpha = mean |w| = 0.75; sign(0) = +1
    torch.testing.assert_close(binarize(w), torch.tensor([[0.75, -0.75, 0.75, 0.75]]))


def _pair(mode):
    torch.manual_seed(0)
    q = QATExperts(num_experts=4, dim=8, hidden=6, mode=mode, backend="eager")
    plain = Experts(num_experts=4, dim=8, hidden=6, backend="eager")
    with torch.no_grad():
        plain.gate_up_proj.copy_((ternarize if mode == "ternary" else binarize)(q.gate_up_proj))
        plain.down_proj.copy_((ternarize if mode == "ternary" else binarize)(q.down_proj))
    return q, plain


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_forward_uses_the_quantized_weights_and_the_ste_passes_their_gradient(mode):
    q, plain = _pair(mode)
    x = torch.randn(10, 8)
    with torch.no_grad():
        routing = build_router("topk", dim=8, num_experts=4, k=2)(x)
    y, ref = q(x, routing), plain(x, routing)
    assert torch.equal(y, ref)  # exactly the quantized weights
    assert not torch.allclose(y, Experts.forward(q, x, routing))  # and not the latent ones
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(q.gate_up_proj.grad, plain.gate_up_proj.grad)  # STE: d/dW_q on the latent W
    torch.testing.assert_close(q.down_proj.grad, plain.down_proj.grad)
    m = q.materialize()
    assert type(m) is Experts and torch.equal(m(x, routing), ref.detach())
    values = m.gate_up_proj[0, 0].unique()
    assert len(values) <= (2 if mode == "binary" else 3)


def test_to_qat_shares_weights_and_materialize_gives_a_plain_model(tmp_path):
    from moekit.train.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    model = MoELM(tiny_lm(num_experts=4, expert_hidden=16, num_shared_experts=1)).eval()
    latent = model.layers[0].mlp.experts.down_proj
    router_w = model.layers[0].mlp.router.weight.clone()
    shared_w = model.layers[0].mlp.shared_experts.down_proj.weight.clone() if hasattr(
        model.layers[0].mlp.shared_experts, "down_proj") else None
    to_qat(model, "ternary")
    assert model.config.experts == "qat" and model.layers[0].mlp.experts.down_proj is latent
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        y = model(ids).logits
    materialize(model)
    assert model.config.experts == "ffn" and type(model.layers[0].mlp.experts) is Experts
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, y)
    torch.testing.assert_close(model.layers[0].mlp.router.weight, router_w)  # router: full precision
    if shared_w is not None:
        torch.testing.assert_close(model.layers[0].mlp.shared_experts.down_proj.weight, shared_w)
    save_checkpoint(tmp_path, model, {})
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path).eval()(ids).logits, y)
    ptq = post_training_quantize(MoELM(tiny_lm(num_experts=4, expert_hidden=16)), "binary")
    assert ptq.layers[1].mlp.experts.down_proj[0, 0].abs().unique().numel() == 1


def test_qat_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        qat_config(tiny_lm(num_experts=4), "int2")
    with pytest.raises(ValueError, match="dense"):
        qat_config(tiny_lm(), "binary")
    with pytest.raises(ValueError, match="experts='ffn'"):
        qat_config(tiny_lm(num_experts=4, experts="lowrank"), "binary")
    with pytest.raises(ValueError, match="QATExperts: mode"):
        QATExperts(num_experts=2, dim=4, hidden=4, mode="int4")
    with pytest.raises(ValueError, match="no QATExperts"):
        materialize(MoELM(tiny_lm(num_experts=4, expert_hidden=16)))


def test_qat_run_trains_latent_weights_and_writes_ternary_experts(trained_run, tmp_path):
    from moekit.train.checkpoint import load_model, read_meta

    out = tmp_path / "ternary"
    res = qat_run(trained_run, out, mode="ternary", finetune=FinetuneConfig(steps=2, batch_size=2, seq_len=16))
    assert res.step == 2
    model = load_model(out)
    assert model.config.experts == "ffn" and not (out / "checkpoint" / "trainer_state.pt").exists()
    w = model.layers[0].mlp.experts.gate_up_proj
    for row in w.reshape(-1, w.shape[-1])[:8]:
        assert row.abs().unique().numel() <= 2  # {0, alpha}
    src = load_model(trained_run)
    assert not torch.equal(post_training_quantize(src, "ternary").layers[0].mlp.experts.gate_up_proj, w)  # trained
    assert read_meta(out)["compress"][-1]["mode"] == "ternary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "ternary"]
