"""Layer-adaptive pruning budgets: the allocation against brute force, per-layer expert counts in LMConfig
(save/load, count_params), and `prune(budget="adaptive")` end to end."""

from __future__ import annotations

import itertools

import pytest
import torch

from moekit.compress import calibrate, prune
from moekit.compress.prune import allocate
from moekit.models import LMConfig, MoELM
from moekit.models.params import count_params
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.helpers import tiny_lm


def test_allocate_by_hand_and_against_brute_force():
    # (2, 0) costs 10, (1, 1) costs 6, (0, 2) costs 6: the first minimum, fewer removals earlier... (1, 1)
    assert allocate({0: [0.0, 1.0, 10.0], 1: [0.0, 5.0, 6.0]}, 2) == {0: 1, 1: 1}
    assert allocate({0: [0.0, 1.0, 2.0], 1: [0.0, 5.0, 6.0]}, 2) == {0: 2, 1: 0}
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        costs = {b: [0.0] + sorted(torch.rand(4, generator=g).tolist()) for b in (0, 2, 3)}
        for total in range(0, 13):
            got = allocate(costs, total)
            assert sum(got.values()) == total
            brute = min(sum(costs[b][n] for b, n in zip(costs, ns, strict=True))
                        for ns in itertools.product(range(5), repeat=3) if sum(ns) == total)
            assert sum(costs[b][n] for b, n in got.items()) == pytest.approx(brute)
    with pytest.raises(ValueError, match="at most 4"):
        allocate({0: [0.0, 1.0], 1: [0.0, 1.0, 2.0, 3.0]}, 5)


def test_per_layer_expert_counts_build_save_load_and_count(tmp_path):
    cfg = tiny_lm(n_layers=3, first_k_dense=1, num_experts=6, expert_hidden=16, num_experts_per_layer=[0, 6, 3])
    assert LMConfig.from_dict(cfg.to_dict()) == cfg and [cfg.experts_in(i) for i in range(3)] == [0, 6, 3]
    model = MoELM(cfg).eval()
    assert model.layers[2].mlp.experts.num_experts == 3 and model.layers[2].mlp.router.num_experts == 3
    save_checkpoint(tmp_path, model, {})
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(ids).logits, model(ids).logits)
    per_expert = 3 * 32 * 16
    uniform = count_params(cfg.replace(num_experts_per_layer=None))
    assert uniform.experts_total - count_params(cfg).experts_total == 3 * per_expert
    for bad in ([6, 6, 3], [0, 6], [0, 5, 3], [0, 0, 6], [0, 6, 3.0]):
        with pytest.raises(ValueError, match="LMConfig.num_experts_per_layer"):
            cfg.replace(num_experts_per_layer=bad)


def _model():
    torch.manual_seed(0)
    model = MoELM(tiny_lm(n_layers=3, num_experts=6, expert_hidden=16, max_seq_len=32)).eval()
    with torch.no_grad():  # make block 0's experts matter little, block 2's much: the budget should follow
        model.layers[0].mlp.experts.down_proj.mul_(0.05)
        model.layers[2].mlp.experts.down_proj.mul_(5.0)
    return model


def test_adaptive_budget_removes_the_same_total_with_less_distortion(tmp_path):
    batches = [torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    uni, ada = _model(), _model()
    r_uni = prune(uni, "frequency", calibrate(uni, batches), ratio=0.5, protect_super_experts=False)
    r_ada = prune(ada, "frequency", calibrate(ada, batches), ratio=0.5, protect_super_experts=False,
                  budget="adaptive")
    sizes = [len(r_ada.kept[b]) for b in range(3)]
    assert sum(sizes) == sum(len(v) for v in r_uni.kept.values()) == 9
    assert sizes[0] < 3 < sizes[2]  # more removed where the experts matter less
    uniform_cost = sum(r_ada.costs[b][3] for b in range(3))
    assert sum(r_ada.costs[b][6 - sizes[b]] for b in range(3)) <= uniform_cost
    assert ada.config.num_experts_per_layer == sizes and ada.config.num_experts == max(sizes)
    assert r_ada.record()["budget"] == "adaptive"
    save_checkpoint(tmp_path, ada, {})
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(x).logits, ada(x).logits)
    with pytest.raises(ValueError, match="budget must be one of"):
        prune(_model(), "frequency", calibrate(uni, batches), ratio=0.5, budget="greedy")


def test_adaptive_budget_needs_calibration_inputs_and_hf_refuses_unequal_counts(tmp_path):
    model = _model()
    cal = calibrate(model, [torch.randint(0, 64, (2, 8))], record=("frequency",))
    with pytest.raises(ValueError, match="needs the calibration inputs"):
        prune(model, "frequency", cal, ratio=0.5, budget="adaptive")
    assert model.config.num_experts == 6  # unchanged
    tf = pytest.importorskip("transformers")
    import moekit.hf as mh
    from moekit.compress.hf import save_hf

    config = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
                              num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = mh.patch(tf.AutoModelForCausalLM.from_config(config).eval())
    with torch.no_grad():
        hf.model.layers[0].mlp.experts.down_proj.mul_(0.01)
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    r = prune(hf, "reap", calibrate(hf, batches), ratio=0.5, budget="adaptive", protect_super_experts=False)
    assert len(r.kept[0]) != len(r.kept[1])
    with pytest.raises(ValueError, match="cannot store the compressed model"):
        save_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_unequal_expert_counts():
    pytest.importorskip("transformers")
    from moekit.hf.export import ExportError, hf_config_for

    cfg = tiny_lm(num_experts=6, expert_hidden=16, num_experts_per_layer=[6, 3])
    with pytest.raises(ExportError, match=r"different expert counts \[6, 3\]"):
        hf_config_for(cfg, "mixtral")
    hf_config_for(cfg.replace(num_experts_per_layer=[6, 6]), "mixtral")  # equal counts export
