"""Quantization-aware fine-tuning of routed experts to binary or ternary weights.

- binary: BinaryConnect (Courbariaux et al. 2015, "BinaryConnect: Training Deep Neural Networks with binary
  weights during propagations"): sign(W) x a per-row scale mean |W|.
- ternary: the ternary experts of MoTE ("MoTE: Mixture of Ternary Experts for Memory-efficient Large Multimodal
  Models", 2025) with the quantizer of Ternary Weight Networks (Li et al. 2016): {-1, 0, +1} x a per-row scale,
  threshold 0.7 x mean |W|.

Only the routed experts are quantized: routers, shared experts, attention and embeddings stay in full precision.
The model trains with the experts variant "qat" (`moekit.layers.qat.QATExperts`: latent full-precision weights,
quantized weights in the forward pass, a straight-through estimator in the backward pass) through moekit's
trainer, then `materialize` turns every layer back into plain `Experts` holding the quantized values (a checkpoint
any moekit tool reads; `moekit.compress.quant` can then pack it). `post_training_quantize` is the same quantizer
without training (the baseline QAT must beat).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from moekit.compress.calibrate import moe_layers
from moekit.compress.finetune import FinetuneConfig, finetune_run
from moekit.layers.experts import Experts
from moekit.layers.qat import QAT_MODES, QATExperts
from moekit.models.config import LMConfig
from moekit.train.trainer import TrainResult


def qat_config(cfg: LMConfig, mode: str) -> LMConfig:
    """`cfg` with its routed experts as the "qat" variant in `mode` (the experts must be plain "ffn")."""
    if mode not in QAT_MODES:
        raise ValueError(f"qat: mode must be one of {list(QAT_MODES)}, got {mode!r}")
    if not cfg.num_experts:
        raise ValueError("qat: the model is dense (num_experts=0); there are no routed experts to quantize")
    if cfg.experts != "ffn":
        raise ValueError(f"qat: needs plain fused experts (experts='ffn'), the model has experts={cfg.experts!r}")
    return cfg.replace(experts="qat", experts_args={"mode": mode})


def to_qat(model: nn.Module, mode: str) -> nn.Module:
    """Make every MoE layer's routed `Experts` of `model` (a moekit LM) `QATExperts` in `mode`, in place, sharing
    the parameters (the latent weights); `model.config` follows. Returns `model`."""
    if isinstance(getattr(model, "config", None), LMConfig):
        new_cfg = qat_config(model.config, mode)
    elif mode not in QAT_MODES:
        raise ValueError(f"qat: mode must be one of {list(QAT_MODES)}, got {mode!r}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"qat: {type(model).__name__} has no MoE layers")
    for b, layer in layers:
        e = layer.experts
        if type(e) is not Experts or e.sharded:
            raise ValueError(f"qat: block {b} has {type(e).__name__} experts; plain unsharded Experts expected")
    for _, layer in layers:
        e = layer.experts
        args = {k: v for k, v in e.config().items()}
        q = QATExperts(**args, mode=mode).to(device=e.down_proj.device)
        for name, p in e.named_parameters(recurse=False):
            setattr(q, name, p)
        layer.experts = q
    if isinstance(getattr(model, "config", None), LMConfig):
        model.config = new_cfg
    return model


def materialize(model: nn.Module) -> nn.Module:
    """Replace every `QATExperts` of `model` by plain `Experts` holding its quantized weights, in place; a moekit
    LM's config goes back to experts="ffn". Returns `model`."""
    found = False
    for _, layer in moe_layers(model):
        if isinstance(layer.experts, QATExperts):
            layer.experts = layer.experts.materialize()
            found = True
    if not found:
        raise ValueError(f"materialize: {type(model).__name__} has no QATExperts (nothing to materialize)")
    if isinstance(getattr(model, "config", None), LMConfig):
        model.config = model.config.replace(experts="ffn", experts_args={})
    return model


def post_training_quantize(model: nn.Module, mode: str) -> nn.Module:
    """Quantize the routed experts of `model` to `mode` without training (in place): the PTQ baseline."""
    return materialize(to_qat(model, mode))


def qat_run(src: str | Path, out: str | Path, *, mode: str = "ternary", finetune: FinetuneConfig | None = None,
            force: bool = False, progress: bool = False) -> TrainResult:
    """Fine-tune the run `src` with `mode`-quantized routed experts (straight-through estimator) for
    `finetune.steps` steps on its data, then write the run folder `out` with the experts materialized (plain
    experts holding the binary / ternary values; the checkpoint has no optimiser state)."""
    from moekit.train.checkpoint import load_model, read_meta, save_checkpoint

    finetune = finetune or FinetuneConfig()
    model_cfg = qat_config(LMConfig.from_dict(read_meta(src)["model"]), mode)

    def finish(run: Path) -> None:
        meta = {k: v for k, v in read_meta(run).items() if k != "model"}
        save_checkpoint(run, materialize(load_model(run)), meta)

    record = {"method": "qat", "mode": mode, **{f"finetune_{k}": v for k, v in dataclasses.asdict(finetune).items()}}
    return finetune_run(src, out, finetune, record=record, model_cfg=model_cfg, finish=finish, force=force,
                        progress=progress)
