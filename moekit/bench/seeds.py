"""Several seeds per leaderboard entry: where each seed's run lives, and the per-entry mean and spread.

Seeds differ only in model initialisation, data order and router noise: every seed of one leaderboard trains on
the data of the first seed (`DataConfig.seed` = the first of `--seeds`). The first seed's run is the single-seed
run of that seed (`runs/<entry>/`, as `--seed` has always written it, so old single-seed folders are reused);
every further seed `k` runs in `runs/<entry>/seed<k>/`.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

# metrics averaged over seeds (mean only); the validation loss also gets its spread
MEAN_ONLY = ("tokens_per_s", "active_experts", "load_max_over_mean", "load_cv", "dropped_frac",
             "expert_domain_mi_bits", "active_flops_per_token", "params_total")


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> [0, 1, 2]: distinct non-negative integers, comma-separated; anything else is a ValueError
    that quotes what it found."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise ValueError(f"--seeds expects comma-separated non-negative integers such as 0,1,2; got {text!r}")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds expects distinct seeds; got {text!r}")
    return seeds


def seed_run_dir(out: Path, entry: str, seed: int, first_seed: int) -> Path:
    """The run folder of `entry` trained with `seed` in a leaderboard whose data seed is `first_seed`."""
    base = Path(out) / "runs" / entry
    return base if seed == first_seed else base / f"seed{seed}"


def spread(values: list[float]) -> dict[str, float | None]:
    """mean, sample standard deviation (n - 1; None for one value), min and max of `values`."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def aggregate(rows: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One entry's leaderboard row over seeds, from its per-seed rows (same order as `seeds`).

    val_loss is the mean over seeds, with val_loss_std (sample std), val_loss_min and val_loss_max; per domain
    the same under val_loss_per_domain (means), val_loss_per_domain_std / _min / _max; MEAN_ONLY metrics are
    means; `per_seed` keeps each seed's loss, per-domain losses and eval history."""
    if len(rows) != len(seeds) or not rows:
        raise ValueError(f"expected one row per seed ({len(seeds)} seeds), found {len(rows)} rows")
    first = rows[0]
    loss = spread([r["val_loss"] for r in rows])
    domains = list(first["val_loss_per_domain"])
    per = {d: spread([r["val_loss_per_domain"][d] for r in rows]) for d in domains}
    depth = None
    if first.get("depth_processed"):
        depth = {j: statistics.fmean(r["depth_processed"][j] for r in rows) for j in first["depth_processed"]}
    out = {k: first[k] for k in ("router", "registered", "router_args", "note", "dtype")}
    out.update({
        "seeds": list(seeds), "n_seeds": len(seeds),
        "val_loss": loss["mean"], "val_loss_std": loss["std"], "val_loss_min": loss["min"],
        "val_loss_max": loss["max"],
        "val_loss_per_domain": {d: s["mean"] for d, s in per.items()},
        "val_loss_per_domain_std": {d: s["std"] for d, s in per.items()},
        "val_loss_per_domain_min": {d: s["min"] for d, s in per.items()},
        "val_loss_per_domain_max": {d: s["max"] for d, s in per.items()},
        "trained_on": sorted({r["trained_on"] for r in rows}),
        "depth_processed": depth,
    })
    out.update({k: statistics.fmean(r[k] for r in rows) for k in MEAN_ONLY})
    out["train_seconds"] = (sum(r["train_seconds"] for r in rows) if all(r["train_seconds"] is not None for r in rows)
                            else None)
    out["per_seed"] = [{"seed": s, "val_loss": r["val_loss"], "val_loss_per_domain": r["val_loss_per_domain"],
                        "history": r["history"]} for s, r in zip(seeds, rows, strict=True)]
    return out


def fmt_std(x: float | None) -> str:
    """A spread for the table: '-' when undefined (one seed)."""
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"
