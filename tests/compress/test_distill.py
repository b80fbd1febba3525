"""Distillation: the KD term by hand, zero KL and zero gradient for a student equal to its teacher, knowledge
augmentation's sampled routing, and a short distillation run that lowers the KL."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moekit.compress.distill import (
    DistillConfig,
    Distiller,
    SampledRouter,
    disable_sampling,
    distill_run,
    enable_sampling,
    kd_loss,
)
from moekit.compress.finetune import FinetuneConfig
from moekit.models import MoELM
from moekit.routing import build_router
from tests.helpers import tiny_lm


def test_kd_loss_by_hand_on_three_tokens():
    s, t, tau = [1.0, 0.0, -1.0], [0.0, 2.0, 0.0], 2.0

    def softmax(z):
        e = [math.exp(v / tau) for v in z]
        return [v / sum(e) for v in e]

    ps, pt = softmax(s), softmax(t)
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    got = kd_loss(torch.tensor([s]), torch.tensor([t]), tau)
    assert got.item() == pytest.approx(tau**2 * kl, rel=1e-6)
    # two positions: the mean; M augmented teachers [M, ..., V]: the mean of the M KL terms
    two = kd_loss(torch.tensor([s, t]), torch.tensor([t, t]), tau)
    assert two.item() == pytest.approx(tau**2 * kl / 2, rel=1e-6)
    aug = kd_loss(torch.tensor([s]), torch.tensor([[t], [s]]), tau)
    assert aug.item() == pytest.approx(tau**2 * kl / 2, rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_student_equal_to_teacher_has_zero_kl_and_zero_gradient():
    torch.manual_seed(0)
    student = MoELM(tiny_lm(num_experts=4, expert_hidden=16))
    distiller = Distiller(copy.deepcopy(student), DistillConfig(alpha=1.0, temperature=2.0))
    x = torch.randint(0, 64, (2, 12))
    loss = distiller(x, x, student(x))
    assert abs(loss.item()) < 1e-6
    loss.backward()
    grads = [p.grad.abs().max().item() for p in student.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6
    # a different student: positive KL and a gradient
    other = MoELM(tiny_lm(num_experts=4, expert_hidden=16))
    loss2 = distiller(x, x, other(x))
    loss2.backward()
    assert loss2.item() > 1e-4 and max(p.grad.abs().max().item() for p in other.parameters() if p.grad is not None) > 0


def test_sampled_router_draws_distinct_experts_beyond_top_k_and_keeps_the_weight_total():
    torch.manual_seed(0)
    router = build_router("topk", dim=8, num_experts=6, k=2)
    x = torch.randn(400, 8)
    base = router(x)
    r = SampledRouter(router=router, temperature=5.0)(x)
    assert r.expert_ids.shape == (400, 2) and (r.expert_ids[:, 0] != r.expert_ids[:, 1]).all()
    torch.testing.assert_close(r.weights.sum(-1), base.weights.sum(-1))
    p = torch.softmax(base.logits, -1).gather(1, r.expert_ids)
    torch.testing.assert_close(r.weights, p / p.sum(-1, keepdim=True))
    off_top = (r.expert_ids.unsqueeze(-1) != base.expert_ids.unsqueeze(1)).all(-1)
    assert off_top.any()  # non-top-k experts are used
    with pytest.raises(ValueError, match="temperature"):
        SampledRouter(router=router, temperature=0.0)
    model = MoELM(tiny_lm(num_experts=4, expert_hidden=16))
    enable_sampling(model)
    assert all(isinstance(b.mlp.router, SampledRouter) for b in model.layers)
    disable_sampling(model)
    assert not any(isinstance(b.mlp.router, SampledRouter) for b in model.layers)
    with pytest.raises(ValueError, match="no MoE layers"):
        enable_sampling(MoELM(tiny_lm()))


def test_knowledge_augmentation_gives_m_teacher_distributions():
    torch.manual_seed(0)
    teacher = MoELM(tiny_lm(num_experts=4, expert_hidden=16))
    d = Distiller(teacher, DistillConfig(samples=3, sample_temperature=4.0))
    x = torch.randint(0, 64, (2, 8))
    t = d.teacher_logits(x)
    assert t.shape == (3, 2, 8, 64)
    assert not torch.allclose(t[0], t[1])  # different expert draws


@pytest.mark.parametrize("field,value", [("alpha", 0.0), ("temperature", -1.0), ("samples", -1), ("samples", 1.5)])
def test_distill_config_errors(field, value):
    with pytest.raises(ValueError, match=f"DistillConfig.{field}"):
        DistillConfig(**{field: value})


class _RandomTokens:
    def sample_batch(self, batch_size, seq_len, generator):
        x = torch.randint(0, 64, (batch_size, seq_len + 1), generator=generator)
        return x[:, :-1], x[:, 1:], torch.zeros(batch_size, dtype=torch.long)


def test_a_few_distillation_steps_lower_the_kl(tmp_path):
    from moekit.train import TrainConfig, train

    torch.manual_seed(0)
    teacher = MoELM(tiny_lm(num_experts=4, expert_hidden=16)).eval()
    with torch.no_grad():
        teacher.embed_tokens.weight.mul_(40)  # (tied head) sharp next-token distributions, far from the student's
    student_cfg = tiny_lm()  # a dense student, its own random init
    x = torch.randint(0, 64, (4, 16))
    distiller = Distiller(teacher, DistillConfig(alpha=4.0, temperature=1.0))

    def kl(model):
        with torch.no_grad():
            return kd_loss(model.eval()(x).logits, teacher(x).logits).item()

    torch.manual_seed(0)
    before = kl(MoELM(student_cfg))
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=8, eval_windows=1)
    windows = {"all": (x[:, :-1], x[:, 1:])}
    res = train(student_cfg, cfg, _RandomTokens(), windows, tmp_path / "run", progress=False, extra_loss=distiller)
    from moekit.train.checkpoint import load_model

    assert [r["extra"] > 0 for r in res.train_log] == [True]
    assert kl(load_model(tmp_path / "run")) < 0.8 * before  # 3.56 -> 2.50


def test_distill_run_writes_a_run_folder_or_nothing(trained_run, tmp_path):
    from moekit.compress.run import compress_run
    from moekit.train.checkpoint import load_model, read_meta

    pruned = tmp_path / "pruned"
    compress_run("frequency", trained_run, pruned, ratio=0.25, calib_batches=1, evaluate=False)
    out = tmp_path / "distilled"
    res = distill_run(trained_run, pruned, out, distill=DistillConfig(samples=2),
                      finetune=FinetuneConfig(steps=2, batch_size=2, seq_len=16))
    assert res.step == 2 and res.run_dir == out and res.train_log[-1]["extra"] > 0
    assert load_model(out).config.num_experts == 3
    rec = read_meta(out)["compress"]
    assert [r["method"] for r in rec] == ["frequency", "distill"] and rec[-1]["samples"] == 2
    assert (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled", "pruned", "run"]
    with pytest.raises(FileExistsError, match="--force"):
        distill_run(trained_run, pruned, out, finetune=FinetuneConfig(steps=1))
    with pytest.raises(ValueError, match="FinetuneConfig.steps"):
        FinetuneConfig(steps=0)
