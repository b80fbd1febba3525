"""The router leaderboard: moekit's LM trained with every router on the built-in corpus, same data,
steps, seed and (nominal) active FLOPs per token, measured side by side.

Per router it reports validation loss (overall and per domain), training tokens/s, active experts per
token, expert load (max/mean and coefficient of variation), dropped token-slots, and the mutual
information between experts and domains; it writes `leaderboard.md`, `leaderboard.json`,
`loss_curves.png` and `loss_vs_flops.png` into the output folder, one training run per router under
`runs/`. Finished runs are reused when the command is run again with the same budget.

Equal compute: every MoE entry uses E experts of width F and two expert evaluations per token (k = 2,
or k = 1 over experts of width 2F for Switch, or 2 iterations of top-1 for Chain-of-Experts); routers
whose number of experts varies per token (top-p, null experts, expert choice, SMoE-Dropout in
training) are reported at their measured active FLOPs, which is what the loss-vs-FLOPs plot is for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moekit.data import DataConfig, prepare_data
from moekit.models import LMConfig, MoELM, count_params
from moekit.train.checkpoint import has_checkpoint, load_model, read_meta
from moekit.train.config import TrainConfig
from moekit.train.report import read_jsonl
from moekit.train.run import val_windows
from moekit.train.trainer import train
from moekit.utils.deps import pyplot
from moekit.utils.io import atomic_write_text


@dataclass(frozen=True)
class Budget:
    """Model size, data and training length of one leaderboard budget."""

    steps: int  # optimiser steps per router
    batch_size: int  # sequences per step
    seq_len: int  # tokens per sequence
    lr: float  # peak learning rate
    vocab_size: int  # BPE vocabulary of the built-in corpus
    max_chars_per_domain: int  # built-in corpus characters per domain
    dim: int  # model width D
    n_layers: int  # transformer blocks (all MoE)
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads
    num_experts: int  # E
    expert_hidden: int  # F, width of one expert (k = 2 experts per token)
    eval_every: int  # validation cadence (steps)
    eval_windows: int  # validation windows per domain
    minutes_2_cores: float  # rough wall time of the whole leaderboard on 2 CPU cores


BUDGETS: dict[str, Budget] = {
    # seconds: what CI runs (tests/bench)
    "smoke": Budget(steps=3, batch_size=2, seq_len=16, lr=3e-3, vocab_size=320, max_chars_per_domain=60_000,
                    dim=32, n_layers=2, n_heads=2, n_kv_heads=1, num_experts=4, expert_hidden=16,
                    eval_every=3, eval_windows=2, minutes_2_cores=0.5),
    # about 30 minutes on 2 quiet CPU cores for all 27 entries: measured ~0.25 s per step of this model
    # (2048 tokens) -> ~65 s of training + evaluation per top-2 entry; SMEAR's per-token merge and
    # SMoE-Dropout's growing k cost 2-3x that; plus building the tokenizer once
    "small": Budget(steps=250, batch_size=16, seq_len=128, lr=3e-3, vocab_size=4096, max_chars_per_domain=1_000_000,
                    dim=128, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=8, expert_hidden=128,
                    eval_every=50, eval_windows=16, minutes_2_cores=30.0),
    # hours: a closer look (wider experts, longer context, more steps)
    "medium": Budget(steps=2000, batch_size=16, seq_len=256, lr=3e-3, vocab_size=8192,
                     max_chars_per_domain=2_000_000, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=8,
                     expert_hidden=256, eval_every=200, eval_windows=32, minutes_2_cores=900.0),
}


@dataclass(frozen=True)
class Entry:
    """One leaderboard row: a registered router with its arguments and any model overrides."""

    router: str | None  # registered router name (None: the dense baseline)
    router_args: dict[str, Any] = field(default_factory=dict)
    expert_scale: int = 1  # expert width = scale * F (k = 1 routers use 2F to keep the active FLOPs)
    model: dict[str, Any] = field(default_factory=dict)  # other LMConfig overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (e.g. THOR's consistency)
    note: str = ""  # shown in the table


ENTRIES: dict[str, Entry] = {
    "dense": Entry(None, note="dense SwiGLU of width 2F (same active FLOPs)"),
    "topk": Entry("topk", {"k": 2}),
    "switch": Entry("switch", {"k": 1}, expert_scale=2, note="top-1 over experts of width 2F, capacity 1.25"),
    "expert_choice": Entry("expert_choice", {"k": 2}),
    "deepseek": Entry("deepseek", {"k": 2}),
    "topp": Entry("topp", {"p": 0.4, "max_k": 4}, note="variable experts per token"),
    "null_experts": Entry("null_experts", {"k": 2, "num_null": 2}, note="a null slot costs nothing"),
    "hash": Entry("hash", {"k": 2}),
    "random": Entry("random", {"k": 2}),
    "attention": Entry("attention", {"k": 2}),
    "recurrent": Entry("recurrent", {"k": 2, "hidden": 32}, note="GRU state of width 32 (RMoE keeps it small)"),
    "mixture_of_routers": Entry("mixture_of_routers", {"k": 2, "num_routers": 4}),
    "stochastic": Entry("stochastic", {"k": 1}, expert_scale=2, train={"consistency": 1.0},
                        note="THOR: random top-1 over experts of width 2F, two passes per batch with the consistency "
                             "regulariser (alpha 1; twice the training FLOPs, tok/s counts one pass)"),
    "smoe_dropout": Entry("smoe_dropout", {"k_start": 1, "eval_k": 2},
                          note="k grows 1 -> E in training (more training FLOPs); evaluated at k = 2"),
    "moec": Entry("moec", {"k": 2, "cluster_size": 2}),
    "graph_of_tokens": Entry("graph_of_tokens", {"k": 2}),
    "prototype": Entry("prototype", {"k": 2}),
    "uncertainty": Entry("uncertainty", {"k": 2}),
    "chain": Entry("topk", {"k": 1}, model={"moe_iterations": 2}, note="Chain-of-Experts: 2 iterations of top-1"),
    "smear": Entry("smear", {}, expert_scale=2, model={"experts": "smear"},
                   note="one merged expert of width 2F per token (causal prefix routing); the per-token merge "
                        "costs E expert projections in this implementation, counted here as 1"),
    "film": Entry("uncertainty", {"k": 2}, expert_scale=2, model={"experts": "film"},
                  note="MoFME: uncertainty router over feature-modulated experts sharing one FFN of width 2F"),
    "duo": Entry("null_experts", {"k": 1, "num_null": 1, "normalize": False}, expert_scale=2,
                 model={"experts": "duo", "num_experts": 2},
                 note="Duo-LLM: per token a big (2F) or small (F/2) FFN, or skip (null expert)"),
    "widenet": Entry("topk", {"k": 2}, model={"share_blocks": True},
                     note="WideNet: one attention + MoE shared by all blocks, per-block norms (fewer parameters)"),
    "autonomy": Entry("autonomy", {"k": 2, "rank": 16}, model={"experts": "autonomy", "experts_args": {"rank": 16}},
                      note="Autonomy-of-Experts: experts pick themselves by low-rank activation norm"),
    "hecto": Entry("topk", {"k": 1}, expert_scale=2, model={"experts": "hecto", "num_experts": 2},
                   note="Hecto: top-1 between an FFN expert of width 2F and a GRU expert (hidden D) that sees only "
                        "its own tokens"),
    "hecto_baseline": Entry("topk", {"k": 1}, expert_scale=2, model={"num_experts": 2},
                            note="Hecto's homogeneous baseline: the same top-1 routing between two FFN experts of "
                                 "width 2F"),
    "mixture_of_depths": Entry("topk", {"k": 2}, model={"mod_capacity": 0.125},
                               note="Mixture-of-Depths on top-2 MoE blocks: blocks 1 and 3 process 12.5% of each "
                                    "sequence (top-k in training, causal per-token decisions in evaluation)"),
}


def model_config(entry: Entry, budget: Budget, vocab_size: int) -> LMConfig:
    """The LMConfig of one entry under a budget."""
    base = dict(vocab_size=vocab_size, dim=budget.dim, n_layers=budget.n_layers, n_heads=budget.n_heads,
                n_kv_heads=budget.n_kv_heads, max_seq_len=budget.seq_len)
    if entry.router is None:
        return LMConfig(**base, ffn_hidden=2 * budget.expert_hidden, **entry.model)
    args = dict(entry.router_args)
    if entry.router == "smoe_dropout":
        args.setdefault("anneal_steps", budget.steps)
    moe = dict(num_experts=budget.num_experts, expert_hidden=entry.expert_scale * budget.expert_hidden,
               router=entry.router, router_args=args)
    return LMConfig(**base, **{**moe, **entry.model})


@dataclass
class RoutingMeasure:
    """Validation loss and routing statistics of a trained model."""

    loss: float
    loss_per_domain: dict[str, float]
    active_experts: float  # real experts per token, mean over MoE layers (0 for dense)
    load_max_over_mean: float  # busiest expert's load over the mean, mean over layers
    load_cv: float  # std / mean of the expert loads, mean over layers
    dropped_frac: float  # dropped token-slots / token-slots the routers asked for
    expert_domain_mi: float  # I(expert; domain) in bits, mean over layers
    expert_flops_per_token: float  # routed-expert forward FLOPs per token, summed over MoE layers (expert_flops)
    depth_fractions: dict[int, float] = field(default_factory=dict)  # MoD block -> share of the tokens it processed


def mutual_information(joint: torch.Tensor) -> float:
    """I(row; column) in bits of a [domains, experts] count table."""
    p = joint.double() / joint.sum().clamp_min(1)
    pr, pc = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return max(0.0, float((p[nz] * torch.log2(p[nz] / (pr @ pc)[nz])).sum()))  # >= 0 up to rounding


@torch.no_grad()
def measure(model: MoELM, windows: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> RoutingMeasure:
    """One eval-mode pass over the validation windows: loss per domain and routing statistics."""
    model.eval()
    cfg = model.config
    losses, counts = {}, {}
    total_loss, total_tok = 0.0, 0
    per_layer: dict[int, dict[str, torch.Tensor]] = {}  # layer -> domain -> [E] slot counts
    slots: dict[int, int] = {}
    dropped: dict[int, int] = {}
    tokens_routed: dict[int, int] = {}
    processed: dict[int, int] = {}  # mixture-of-depths block -> tokens it processed
    for label, (x, y) in windows.items():
        s, n = 0.0, 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            out = model(xb)
            s += float(F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), yb.reshape(-1),
                                       reduction="sum"))
            n += yb.numel()
            for j, sel in enumerate(out.depth):
                if sel is not None:
                    processed[j] = processed.get(j, 0) + int(sel.sum())
            for j, r in enumerate(out.routings):
                if r is None:
                    continue
                c = per_layer.setdefault(j, {}).setdefault(label, torch.zeros(r.num_experts, dtype=torch.long))
                c += r.tokens_per_expert().cpu()
                d = int(r.dropped) if r.dropped is not None else 0
                dropped[j] = dropped.get(j, 0) + d
                slots[j] = slots.get(j, 0) + int((r.expert_ids >= 0).sum()) + d
                tokens_routed[j] = tokens_routed.get(j, 0) + r.num_tokens
        losses[label], counts[label] = s / max(n, 1), n
        total_loss, total_tok = total_loss + s, total_tok + n
    active, lmm, cv, mi, flops = [], [], [], [], 0.0
    for j, by_domain in per_layer.items():
        joint = torch.stack([by_domain[d] for d in sorted(by_domain)])  # [domains, E]
        load = joint.sum(0).double()
        mean = load.mean().clamp_min(1e-9)
        a = float(load.sum()) / max(tokens_routed[j], 1)
        active.append(a)
        lmm.append(float(load.max() / mean))
        cv.append(float(load.std(unbiased=False) / mean))
        mi.append(mutual_information(joint))
        flops += expert_flops(cfg, load, max(total_tok, 1))  # per model token (MoD blocks route a subset)
    avg = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    n_slots = sum(slots.values())
    return RoutingMeasure(
        loss=total_loss / max(total_tok, 1), loss_per_domain=losses, active_experts=avg(active),
        load_max_over_mean=avg(lmm), load_cv=avg(cv), dropped_frac=sum(dropped.values()) / n_slots if n_slots else 0.0,
        expert_domain_mi=avg(mi), expert_flops_per_token=flops,
        depth_fractions={j: c / max(total_tok, 1) for j, c in processed.items()},
    )


def expert_flops(cfg: LMConfig, load: torch.Tensor, tokens: int) -> float:
    """Forward FLOPs per token of one MoE layer's routed experts, from its loads [E] over `tokens` tokens.

    A gated expert of width F costs 2 * 3 * D * F per token-slot. SMEAR's merged expert and MoFME's shared
    FFN cost one expert per token whatever the slots; Duo-LLM's small expert has width experts_args
    small_hidden (default F // 4); Hecto's GRU expert (hidden H = experts_args gru_hidden, default D) costs
    2 * (3 (D H + H H) + H D) per token it processes.
    """
    per = 2 * 3 * cfg.dim * cfg.expert_hidden
    if cfg.experts in ("smear", "film"):
        return float(per)
    if cfg.experts == "duo":
        small = cfg.experts_args.get("small_hidden") or max(1, cfg.expert_hidden // 4)
        return float(2 * 3 * cfg.dim * (cfg.expert_hidden * load[0] + small * load[1]) / tokens)
    if cfg.experts == "hecto":
        D, H = cfg.dim, cfg.experts_args.get("gru_hidden") or cfg.dim
        return float((per * load[0] + 2 * (3 * (D * H + H * H) + H * D) * load[1]) / tokens)
    return float(per * load.sum() / tokens)


def active_flops(cfg: LMConfig, m: RoutingMeasure) -> float:
    """Forward FLOPs per token with the measured number of active experts (dense: the closed form).

    Mixture-of-depths blocks count their non-expert FLOPs (attention, norms, router) times the share of
    tokens they processed (attention among the selected tokens counted as linear in that share, an upper
    bound); their experts are already counted per processed token."""
    pc = count_params(cfg)
    # count_params assumes the router's nominal k per MoE layer (and 1 iteration); swap in the measured experts
    # (a dense model has neither)
    non_expert = pc.flops_per_token - 2 * pc.experts_active
    flops = float(non_expert + m.expert_flops_per_token)
    if m.depth_fractions:
        per_block = (non_expert - 2 * cfg.vocab_size * cfg.dim) / cfg.n_layers  # all but the output head
        flops -= sum((1 - f) * per_block for f in m.depth_fractions.values())
    return flops


@dataclass
class LeaderboardResult:
    """What `run_leaderboard` measured and wrote."""

    out: Path
    rows: list[dict[str, Any]]  # one per router, the leaderboard.json rows
    files: list[Path]  # leaderboard.md, leaderboard.json, the plots


def _tokens_per_s(run_dir: Path) -> float:
    log = read_jsonl(run_dir / "train.jsonl")
    vals = sorted(r["tokens_per_s"] for r in (log[1:] or log))  # the first step pays for warm-up
    return vals[len(vals) // 2] if vals else float("nan")  # median: robust to the noisy shared machine


def run_leaderboard(
    budget: str = "smoke",
    routers: list[str] | None = None,
    out: str | Path = "runs/leaderboard",
    *,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> LeaderboardResult:
    """Train and measure every entry in `routers` (default: all of ENTRIES) under `budget`."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; known budgets: {', '.join(BUDGETS)}")
    names = list(ENTRIES) if not routers else list(routers)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise ValueError(f"unknown leaderboard entries {unknown}; known: {', '.join(ENTRIES)}")
    b = BUDGETS[budget]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = DataConfig(vocab_size=b.vocab_size, max_chars_per_domain=b.max_chars_per_domain, seed=seed)
    data = prepare_data(data_cfg, progress=progress)
    base_train = TrainConfig.short_run(
        b.steps, batch_size=b.batch_size, seq_len=b.seq_len, lr=b.lr, eval_every=b.eval_every,
        eval_windows=b.eval_windows, log_every=1, seed=seed,
    )
    windows = val_windows(data, b.seq_len, b.eval_windows)
    rows, run_dirs = [], {}
    for name in names:
        entry = ENTRIES[name]
        cfg = model_config(entry, b, data.vocab_size)
        train_cfg = dataclasses.replace(base_train, **entry.train)
        run_dir = out / "runs" / name
        meta = {"data": dataclasses.asdict(data_cfg), "labels": list(data.label_names), "budget": budget}
        started = has_checkpoint(run_dir)
        old = read_meta(run_dir) if started else {}
        same = started and (LMConfig.from_dict(old["model"]) == cfg  # fields added since fill in their defaults
                            and TrainConfig.from_dict(old["train"]) == train_cfg)
        if started and not same:
            raise FileExistsError(
                f"{run_dir} holds a run of another model or training config (budget, seed); remove it or choose "
                "another --out"
            )
        done = started and old.get("step") == b.steps
        t0 = time.perf_counter()
        if not done:  # a fresh run, or an interrupted one resumed
            log(f"[{len(rows) + 1}/{len(names)}] {name}: training {b.steps} steps" + (" (resuming)" if started else ""))
            res = train(cfg, train_cfg, data.train, windows, run_dir, resume=started, meta=meta, progress=progress)
            if res.interrupted:  # Ctrl-C/SIGTERM: stop here (the run resumes next time), don't rank a half run
                raise KeyboardInterrupt
        seconds = time.perf_counter() - t0
        model = load_model(run_dir)
        m = measure(model, windows, b.batch_size)
        rows.append({
            "router": name, "registered": entry.router, "router_args": cfg.router_args if entry.router else None,
            "note": entry.note, "val_loss": m.loss, "val_loss_per_domain": m.loss_per_domain,
            "tokens_per_s": _tokens_per_s(run_dir), "train_seconds": seconds if not done else None,
            "active_experts": m.active_experts, "load_max_over_mean": m.load_max_over_mean, "load_cv": m.load_cv,
            "dropped_frac": m.dropped_frac, "expert_domain_mi_bits": m.expert_domain_mi,
            "depth_processed": {str(j): f for j, f in m.depth_fractions.items()} or None,
            "active_flops_per_token": active_flops(cfg, m),
            "params_total": sum(p.numel() for p in model.parameters()),  # shared tensors (WideNet, ties) once
            "history": read_jsonl(run_dir / "eval.jsonl"),
        })
        run_dirs[name] = run_dir
    info = {
        "budget": budget, "budget_settings": dataclasses.asdict(b), "seed": seed, "domains": list(data.label_names),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "command": f"moekit bench routers --budget {budget}" + (f" --routers {','.join(names)}" if routers else ""),
    }
    files = [
        _write_json(out / "leaderboard.json", {**info, "rows": rows}),
        plot_curves(run_dirs, out / "loss_curves.png"),
        plot_loss_vs_flops(rows, out / "loss_vs_flops.png"),
    ]
    md = out / "leaderboard.md"
    atomic_write_text(md, render_markdown(info, rows))
    return LeaderboardResult(out, rows, [md, *files])


def _write_json(path: Path, obj: dict) -> Path:
    atomic_write_text(path, json.dumps(obj, indent=2))
    return path


def plot_curves(runs: dict[str, Path], out: Path) -> Path:
    """Training loss (train.jsonl) and validation loss (eval.jsonl) against step, one line per router."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab20")
    for i, (name, run) in enumerate(runs.items()):
        style = dict(color=cmap(i % 20), linestyle="-" if i < 20 else "--", label=name)
        tr, ev = read_jsonl(run / "train.jsonl"), read_jsonl(run / "eval.jsonl")
        if tr:
            axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], alpha=0.8, **style)
        if ev:
            axes[1].plot([r["step"] for r in ev], [r["loss"] for r in ev], marker="o", markersize=3, **style)
    for ax, title in zip(axes, ("training loss", "validation loss"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), ncol=1 + len(runs) // 16)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_loss_vs_flops(rows: list[dict], out: Path) -> Path:
    """Validation loss against measured active forward FLOPs per token, one point per router."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["active_flops_per_token"] / 1e6, r["val_loss"])
        ax.annotate(r["router"], (r["active_flops_per_token"] / 1e6, r["val_loss"]), fontsize=7,
                    xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("active forward FLOPs per token (millions, measured)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs active compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render_markdown(info: dict, rows: list[dict]) -> str:
    """The leaderboard table (sorted by validation loss) with its settings."""
    domains = info["domains"]
    b = info["budget_settings"]
    lines = [
        f"# Router leaderboard (`{info['budget']}` budget)",
        "",
        f"moekit LM, {b['n_layers']} MoE blocks of width {b['dim']}, {b['num_experts']} experts of width "
        f"{b['expert_hidden']} (2 expert evaluations per token unless noted), {b['steps']} steps of "
        f"{b['batch_size']}x{b['seq_len']} tokens, seed {info['seed']}, built-in corpus. "
        f"Command: `{info['command']}`; torch {info['versions']['torch']}, {info['machine']}.",
        "",
        "| router | val loss | " + " | ".join(domains) + " | tok/s | active experts | load max/mean | load CV | "
        "dropped | MI(expert;domain) bits | MFLOPs/token | params (M) |",
        "|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        per = " | ".join(f"{r['val_loss_per_domain'].get(d, math.nan):.3f}" for d in domains)
        lines.append(
            f"| {r['router']} | {r['val_loss']:.3f} | {per} | {r['tokens_per_s']:,.0f} | {r['active_experts']:.2f} | "
            f"{r['load_max_over_mean']:.2f} | {r['load_cv']:.2f} | {r['dropped_frac']:.3f} | "
            f"{r['expert_domain_mi_bits']:.3f} | {r['active_flops_per_token'] / 1e6:.3f} | "
            f"{r['params_total'] / 1e6:.3f} |"
        )
    notes = [f"- **{r['router']}**: {r['note']}" for r in rows if r["note"]]
    lines += ["", "Notes:", *notes, "",
              "![loss curves](loss_curves.png)", "", "![loss vs active FLOPs](loss_vs_flops.png)", ""]
    return "\n".join(lines)
