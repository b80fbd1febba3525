"""The quickstart: train a dense LM and an MoE LM with equal active parameters on the built-in
corpus, compare validation loss per domain, show expert load and domain specialisation, write a report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.data import DataConfig, prepare_data
from moekit.models import count_params
from moekit.models.presets import preset
from moekit.train.checkpoint import has_checkpoint, load_model, read_meta
from moekit.train.config import TrainConfig
from moekit.train.evaluate import EvalResult, evaluate_run
from moekit.train.report import domain_expert_shares, plot_domain_expert_heatmap, plot_loss_curves, specialists
from moekit.train.run import run_training
from moekit.utils.io import atomic_write_text


@dataclass
class QuickstartConfig:
    """Settings of the quickstart (defaults: a few minutes on 2 CPU cores)."""

    out: str = "runs/quickstart"  # output folder: dense/, moe/, report.md, PNGs
    steps: int = 250  # optimiser steps for each model
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    vocab_size: int = 4096  # BPE vocabulary of the built-in corpus
    max_chars_per_domain: int = 2_000_000  # built-in corpus size per domain
    eval_every: int = 50  # validation cadence
    eval_windows: int = 32  # validation windows per domain
    seed: int = 0  # model init, data order
    dense_preset: str = "tiny-dense"  # the dense model
    moe_preset: str = "tiny-moe"  # the MoE model (same active parameters)
    sample_prompt: str = "And God said"  # prompt of the generated sample
    sample_tokens: int = 40  # tokens to generate

    def __post_init__(self) -> None:
        TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr)


@dataclass
class QuickstartResult:
    """What the quickstart measured."""

    out: Path
    evals: dict[str, EvalResult]  # "dense", "moe"
    params: dict[str, dict[str, int]]  # "dense"/"moe" -> total, active, ...
    seconds: dict[str, float]  # training wall time per model
    specialists: dict[str, list[list[tuple[int, float]]]]  # domain -> per MoE layer [(expert, lift)]
    sample: str  # generated text from the MoE model
    report: Path
    figures: list[Path] = field(default_factory=list)


def quickstart(cfg: QuickstartConfig, *, progress: bool = True, log=print) -> QuickstartResult:
    """Train both models, evaluate, write the report. Runs already in `cfg.out` are reused when they
    reached `cfg.steps`, resumed when interrupted, and continued to `cfg.steps` when it is larger."""
    out = Path(cfg.out)
    data_cfg = DataConfig(vocab_size=cfg.vocab_size, max_chars_per_domain=cfg.max_chars_per_domain, seed=cfg.seed)
    data = prepare_data(data_cfg, progress=progress)
    train_cfg = TrainConfig.short_run(
        cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        eval_every=cfg.eval_every,
        eval_windows=cfg.eval_windows,
        log_every=5,
        seed=cfg.seed,
    )
    runs, params, seconds = {}, {}, {}
    for name, p in (("dense", cfg.dense_preset), ("moe", cfg.moe_preset)):
        model_cfg = preset(p, vocab_size=data.vocab_size, max_seq_len=cfg.seq_len)
        run_dir = out / name
        exists = has_checkpoint(run_dir)
        run_cfg = continued(run_dir, train_cfg) if exists else train_cfg
        pc = count_params(model_cfg)
        params[name] = pc.as_dict()
        log(
            f"{name} ({p}): {pc.total / 1e6:.2f}M parameters, {pc.active / 1e6:.2f}M active per token"
            + (f" (continuing the run in {run_dir} to step {cfg.steps})" if exists else "")
        )
        t0 = time.perf_counter()
        if run_training(model_cfg, run_cfg, data_cfg, run_dir, resume=exists, progress=progress).interrupted:
            raise KeyboardInterrupt  # Ctrl-C/SIGTERM: stop (a checkpoint was written; rerunning resumes)
        seconds[name] = time.perf_counter() - t0
        runs[name] = run_dir

    evals = {name: evaluate_run(run)[1] for name, run in runs.items()}  # what `moekit eval RUN` prints
    moe_eval = evals["moe"]
    spec = specialists(moe_eval.expert_counts)
    figures = [
        plot_loss_curves(runs, out / "loss_curves.png"),
        plot_domain_expert_heatmap(moe_eval.expert_counts, moe_eval.moe_layers, out / "domain_expert_heatmap.png"),
    ]
    moe_model = load_model(runs["moe"]).eval()
    ids = torch.tensor([data.tokenizer.encode(cfg.sample_prompt)])
    gen = moe_model.generate(
        ids, cfg.sample_tokens, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(cfg.seed)
    )
    sample = data.tokenizer.decode(gen[0].tolist())
    report = out / "report.md"
    atomic_write_text(report, render_report(cfg, evals, params, seconds, spec, sample))
    return QuickstartResult(out, evals, params, seconds, spec, sample, report, figures)


def continued(run_dir: Path, train_cfg: TrainConfig) -> TrainConfig:
    """The train config that continues the quickstart run in `run_dir` to `train_cfg.steps`: the settings
    that `short_run` derives from the step count (warmup, checkpoint cadence) stay those the run started
    with, and the learning-rate schedule stretches to the new end from where the run stands. A run that
    went further than `train_cfg.steps` is not cut back: that is an error naming both counts."""
    old = read_meta(run_dir).get("train") or {}
    done = old.get("steps", 0)
    if done > train_cfg.steps:
        raise ValueError(
            f"{run_dir} was trained for {done} steps, more than --steps {train_cfg.steps}; pass --steps {done} "
            f"(or more, to continue it) or choose another --out for a fresh pair"
        )
    keep = {k: old[k] for k in ("warmup_steps", "ckpt_every") if k in old}
    return dataclasses.replace(train_cfg, **keep)


def render_report(cfg, evals, params, seconds, spec, sample) -> str:
    """Markdown with the tables, figures and sample."""
    labels = sorted(evals["dense"].loss_per_label)
    lines = [
        "# moekit quickstart",
        "",
        f"Dense (`{cfg.dense_preset}`) and MoE (`{cfg.moe_preset}`, 8 experts, top-2) language models with the same "
        f"active parameters, trained {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens on the built-in corpus "
        f"(seed {cfg.seed}).",
        "",
        "| model | total params | active params/token | train time (s) | val loss | " + " | ".join(labels) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(labels),
    ]
    for name in ("dense", "moe"):
        e, pc = evals[name], params[name]
        per_label = " | ".join(f"{e.loss_per_label[label]:.3f}" for label in labels)
        sizes = f"{pc['total'] / 1e6:.2f}M | {pc['active'] / 1e6:.2f}M"
        lines.append(f"| {name} | {sizes} | {seconds[name]:.0f} | {e.loss:.3f} | {per_label} |")
    lines += [
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Expert load per layer (validation, share of token-slots)",
        "",
    ]
    moe = evals["moe"]
    _, shares = domain_expert_shares(moe.expert_counts)
    for i, layer in enumerate(moe.moe_layers):
        total = sum(torch.tensor(moe.expert_counts[label][i], dtype=torch.float64) for label in labels)
        load = (total / total.sum()).tolist()
        lines.append(
            f"- layer {layer}: " + " ".join(f"{x:.2f}" for x in load) + f"  (max/mean {max(load) * len(load):.2f})"
        )
    lines += [
        "",
        "## Which experts specialise on which domain",
        "",
        "Lift = the domain's share of an expert's tokens over the expert's share overall (1.0 = no preference).",
        "",
    ]
    for label in labels:
        per_layer = "; ".join(
            f"layer {moe.moe_layers[i]}: " + ", ".join(f"expert {e} (x{lift:.2f})" for e, lift in layer)
            for i, layer in enumerate(spec[label])
        )
        lines.append(f"- **{label}**: {per_layer}")
    lines += [
        "",
        "![domain x expert](domain_expert_heatmap.png)",
        "",
        "## Sample from the MoE model",
        "",
        "```",
        sample,
        "```",
        "",
    ]
    return "\n".join(lines)


def as_dict(cfg: QuickstartConfig) -> dict:
    return dataclasses.asdict(cfg)
