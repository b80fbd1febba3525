"""Knowledge distillation from an MoE teacher into a smaller student (a pruned or merged MoE, or a dense LM).

Token-level distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): with
temperature tau, p_T = softmax(z_T / tau) and p_S = softmax(z_S / tau) over the vocabulary at each position,

    L = CE(student, targets) + alpha * tau^2 * mean_tokens KL(p_T || p_S),

trained with moekit's trainer (`moekit.train.train(extra_loss=Distiller(...))`; the cross-entropy is the
trainer's own loss).

Knowledge augmentation from "Every Expert Matters" (Kim et al. 2025, "Every Expert Matters: Towards Effective
Knowledge Distillation for Mixture-of-Experts Language Models"): the routed top-k experts of a teacher leave the
knowledge of its other experts unused, so each step the teacher is run `samples` times with its experts *sampled*
instead of chosen by top-k: every router draws a token's k experts without replacement from softmax(router logits
/ sample_temperature) (`SampledRouter`), and the student is distilled towards each of the M augmented teacher
distributions (the mean of the M KL terms). With `samples=0` the teacher routes as trained (plain KD). This is our
reading of the paper's KA method from its public description; its second method, the Student-Aware Router
(training the teacher's router with the student's feedback), is not implemented.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.compress.calibrate import moe_layers
from moekit.compress.finetune import FinetuneConfig, finetune_run
from moekit.models.lm import LMOutput
from moekit.routing.routing import Routing
from moekit.train.trainer import TrainResult


@dataclass(frozen=True)
class DistillConfig:
    """The distillation term of the loss."""

    alpha: float = 1.0  # weight of tau^2 * KL(teacher || student), added to the student's cross-entropy
    temperature: float = 2.0  # tau: softens both distributions
    samples: int = 0  # Every Expert Matters knowledge augmentation: teacher passes with sampled experts (0: off)
    sample_temperature: float = 1.0  # experts are sampled from softmax(router logits / this)

    def __post_init__(self) -> None:
        for name in ("alpha", "temperature", "sample_temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ValueError(f"DistillConfig.{name} must be a number > 0, got {v!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"DistillConfig.samples must be an integer >= 0 (0: the teacher's own routing), "
                             f"got {self.samples!r}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """tau^2 x mean over positions of KL(softmax(t / tau) || softmax(s / tau)).

    student_logits: [..., V]; teacher_logits: [..., V] (one teacher distribution) or [M, ..., V] (M augmented
    teacher distributions: the mean of the M KL terms). Computed in float32; gradients reach the student only."""
    s = student_logits.float()
    t = teacher_logits.detach().float()
    if t.shape[-s.dim():] != s.shape:
        raise ValueError(f"kd_loss: teacher logits {tuple(t.shape)} do not match the student's {tuple(s.shape)} "
                         "(same vocabulary and positions expected)")
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # [M?, ...]
    return kl.mean() * temperature**2


class SampledRouter(nn.Module):
    """Wrap `router`: each token's k experts are drawn without replacement from softmax(logits / temperature)
    (the router's own logits, real experts only) instead of its choice; the weights are the router's softmax
    probabilities of the drawn experts, rescaled to the total weight the router gave the token (so normalised
    routers stay normalised and a `routed_scale` is kept). Aux losses pass through. Draws use torch's RNG."""

    def __init__(self, *, router: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"SampledRouter: temperature must be > 0, got {temperature!r}")
        self.inner = router
        self.temperature = float(temperature)

    def __getattr__(self, name: str) -> Any:  # num_experts, k, needs_full_sequence, ... of the router
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, x: Tensor, *, context: Any = None) -> Routing:
        """x [T, D] -> Routing with expert_ids [T, k] sampled (every slot filled), weights [T, k]."""
        r = self.inner(x, context=context)
        E, k = r.num_experts, r.expert_ids.shape[1]
        logits = r.logits[:, :E].float()
        ids = torch.multinomial(torch.softmax(logits / self.temperature, dim=-1), k, replacement=False)  # [T, k]
        p = torch.softmax(logits, dim=-1).gather(1, ids)
        total = r.weights.float().sum(-1, keepdim=True)
        w = (p / p.sum(-1, keepdim=True).clamp_min(1e-20) * total).to(r.weights.dtype)
        return Routing(ids, w, r.logits, E, aux=r.aux, dropped=r.dropped, meta=r.meta, state=r.state)


def enable_sampling(model: nn.Module, temperature: float = 1.0) -> None:
    """Wrap the router of every MoE layer of `model` in a `SampledRouter` (in place; `disable_sampling` undoes)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"knowledge augmentation: the teacher {type(model).__name__} has no MoE layers to sample")
    for b, layer in layers:
        if layer.iterations > 1:
            raise ValueError(f"knowledge augmentation: block {b} is a Chain-of-Experts layer; not supported")
        if not isinstance(layer.router, SampledRouter):
            layer.router = SampledRouter(router=layer.router, temperature=temperature)


def disable_sampling(model: nn.Module) -> None:
    """Put every wrapped router back."""
    for _, layer in moe_layers(model):
        if isinstance(layer.router, SampledRouter):
            layer.router = layer.router.inner


class Distiller:
    """The distillation term, as the trainer's `extra_loss(x, y, out)`: alpha x `kd_loss(out.logits, teacher
    logits, temperature)`. The teacher (frozen, eval mode) follows the student to its device; with
    `cfg.samples` > 0 it runs that many times with sampled routing (knowledge augmentation)."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.cfg = cfg
        if cfg.samples:
            enable_sampling(self.teacher, cfg.sample_temperature)

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """x [B, L] token ids -> [B, L, V] (samples=0) or [M, B, L, V] (M = samples)."""
        p = next(self.teacher.parameters())
        if p.device != x.device:
            self.teacher.to(x.device)
        if not self.cfg.samples:
            return self.teacher(x).logits
        return torch.stack([self.teacher(x).logits for _ in range(self.cfg.samples)])

    def __call__(self, x: Tensor, y: Tensor, out: LMOutput) -> Tensor:
        return self.cfg.alpha * kd_loss(out.logits, self.teacher_logits(x), self.cfg.temperature)


def distill_run(
    teacher: str | Path,
    student: str | Path,
    out: str | Path,
    *,
    distill: DistillConfig | None = None,
    finetune: FinetuneConfig | None = None,
    force: bool = False,
    progress: bool = False,
) -> TrainResult:
    """Train the student run (a pruned or merged copy of the teacher, or any LM on the same tokenizer) for
    `finetune.steps` steps on its data with the cross-entropy plus the distillation term from `teacher`, and
    write it as the run folder `out` (`moekit.compress.finetune.finetune_run`)."""
    from moekit.train.checkpoint import load_model, read_meta

    distill = distill or DistillConfig()
    finetune = finetune or FinetuneConfig()
    t = load_model(teacher)
    s_vocab = read_meta(student)["model"]["vocab_size"]
    if t.config.vocab_size != s_vocab:
        raise ValueError(f"distill: the teacher's vocab_size={t.config.vocab_size} differs from the student's "
                         f"{s_vocab}; distillation compares next-token distributions over one vocabulary")
    if distill.samples and not moe_layers(t):
        raise ValueError("distill: --samples (knowledge augmentation) needs an MoE teacher; this one is dense")
    record = {"method": "distill", "teacher": str(Path(teacher)), **dataclasses.asdict(distill),
              **{f"finetune_{k}": v for k, v in dataclasses.asdict(finetune).items()}}
    return finetune_run(student, out, finetune, record=record, extra_loss=Distiller(t, distill), force=force,
                        progress=progress)
