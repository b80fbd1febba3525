"""The router leaderboard's outputs: `leaderboard.md` (the table), `leaderboard.json`, and two plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from moekit.bench.claims import render_claims
from moekit.bench.seeds import fmt_std
from moekit.train.report import plot_loss_curves
from moekit.utils.deps import pyplot
from moekit.utils.io import atomic_write_text


def write_report(out: Path, info: dict, rows: list[dict], runs: dict[str, Path]) -> list[Path]:
    """Write the leaderboard's files into `out`: [leaderboard.md, leaderboard.json, loss_curves.png,
    loss_vs_flops.png]. `info` holds the settings, `rows` one measured entry each, `runs` their run folders."""
    json_path = out / "leaderboard.json"
    atomic_write_text(json_path, json.dumps({**info, "rows": rows}, indent=2))
    files = [
        json_path,
        plot_loss_curves(runs, out / "loss_curves.png", many=True),
        plot_loss_vs_flops(rows, out / "loss_vs_flops.png"),
    ]
    md = out / "leaderboard.md"
    atomic_write_text(md, render_markdown(info, rows))
    return [md, *files]


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
    """The leaderboard table (sorted by validation loss) with its settings. With several seeds (`info["seeds"]`)
    the loss columns are the mean over seeds with its sample std and min/max (per domain: mean ± std), the other
    metrics are means, and the paper claims (`info["claims"]`, moekit.bench.claims) follow the table."""
    domains = info["domains"]
    b = info["budget_settings"]
    seeds = info.get("seeds")
    multi = bool(seeds) and len(seeds) > 1
    seed_text = (f"seeds {', '.join(map(str, seeds))} (data of seed {seeds[0]}; means over seeds)" if multi
                 else f"seed {info['seed']}")
    lines = [
        f"# Router leaderboard (`{info['budget']}` budget)",
        "",
        f"moekit LM, {b['n_layers']} MoE blocks of width {b['dim']}, {b['num_experts']} experts of width "
        f"{b['expert_hidden']} (2 expert evaluations per token unless noted), {b['steps']} steps of "
        f"{b['batch_size']}x{b['seq_len']} tokens, {seed_text}, "
        f"{'reference corpus' if b.get('data') == 'reference' else 'built-in corpus'}. "
        f"Command: `{info['command']}`; torch {info['versions']['torch']}, {info['machine']}.",
        "",
    ]
    loss_head, loss_align = ("val loss | ", "---:|")
    if multi:
        loss_head, loss_align = ("val loss (mean) | std | min | max | ", "---:|---:|---:|---:|")
    lines += [
        "| router | " + loss_head + " | ".join(domains) + " | tok/s | active experts | load max/mean | load CV | "
        "dropped | MI(expert;domain) bits | MFLOPs/token | params (M) |",
        "|---|" + loss_align + "---:|" * len(domains) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["val_loss"]):
        if multi:
            loss = (f"{r['val_loss']:.3f} | {fmt_std(r['val_loss_std'])} | {r['val_loss_min']:.3f} | "
                    f"{r['val_loss_max']:.3f}")
            per = " | ".join(f"{r['val_loss_per_domain'].get(d, math.nan):.3f} ± "
                             f"{fmt_std(r['val_loss_per_domain_std'].get(d))}" for d in domains)
        else:
            loss = f"{r['val_loss']:.3f}"
            per = " | ".join(f"{r['val_loss_per_domain'].get(d, math.nan):.3f}" for d in domains)
        lines.append(
            f"| {r['router']} | {loss} | {per} | {r['tokens_per_s']:,.0f} | {r['active_experts']:.2f} | "
            f"{r['load_max_over_mean']:.2f} | {r['load_cv']:.2f} | {r['dropped_frac']:.3f} | "
            f"{r['expert_domain_mi_bits']:.3f} | {r['active_flops_per_token'] / 1e6:.3f} | "
            f"{r['params_total'] / 1e6:.3f} |"
        )
    notes = [f"- **{r['router']}**: {r['note']}" for r in rows if r["note"]]
    lines += ["", "Notes:", *notes, ""]
    if multi and info.get("claims"):
        lines += [*render_claims(info["claims"]), ""]
    curves = "![loss curves](loss_curves.png)" + (f" (seed {seeds[0]}'s runs)" if multi else "")
    lines += [curves, "", "![loss vs active FLOPs](loss_vs_flops.png)", ""]
    return "\n".join(lines)
