"""The paper claims the router leaderboard re-checks, and the rule that decides whether a gap is seen.

One data structure (`CLAIMS`) names each claim's entry and baseline; `compare` reads them against the
leaderboard's per-entry means and spreads, and both `leaderboard.md` / `leaderboard.json` and docs/leaderboard.md
use it.

The rule: gap = mean val loss of the entry - mean val loss of the baseline (over the same seeds);
spread = the larger of the two entries' sample standard deviations over seeds; the gap is **seen** only when
|gap| > 2 x spread. With fewer than 2 seeds there is no spread and the verdict is "n/a (1 seed)"; a claim whose
entry or baseline was not run is "n/a (not run)".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from moekit.bench.entries import ENTRIES


@dataclass(frozen=True)
class Claim:
    """A paper's claim as a comparison of two leaderboard entries' validation loss."""

    key: str  # short id
    paper: str  # who claimed it
    text: str  # the claim in a line
    entry: str  # the method's leaderboard entry
    baseline: str  # what it is compared with
    expect: Literal["lower", "not_higher"]  # the entry's loss: lower than the baseline's, or not higher
    cheaper: bool = False  # the claim is also that the entry runs fewer active FLOPs per token

    def __post_init__(self) -> None:
        for name in (self.entry, self.baseline):
            if name not in ENTRIES:
                raise ValueError(f"claim {self.key!r}: expected a leaderboard entry, found {name!r}")
        if self.expect not in ("lower", "not_higher"):
            raise ValueError(f"claim {self.key!r}: expect must be 'lower' or 'not_higher', found {self.expect!r}")


CLAIMS: tuple[Claim, ...] = (
    Claim("expert_choice", "Zhou et al. 2022", "expert choice converges faster than top-k",
          "expert_choice", "topk", "lower"),
    Claim("topp", "Huang et al. 2024", "top-p uses fewer experts at equal loss", "topp", "topk", "not_higher",
          cheaper=True),
    Claim("null_experts", "Zeng et al. 2024", "null experts cut FLOPs at equal loss", "null_experts", "topk",
          "not_higher", cheaper=True),
    Claim("mod", "Raposo et al. 2024", "Mixture-of-Depths matches the baseline with fewer FLOPs per forward pass",
          "mixture_of_depths", "topk", "not_higher", cheaper=True),
    Claim("thor", "Zuo et al. 2022", "THOR's random experts with consistency regularisation beat a learned top-1 "
          "router (Switch)", "stochastic", "switch", "lower"),
    Claim("hecto", "Pandey et al. 2025", "Hecto matches or closely trails homogeneous experts", "hecto",
          "hecto_baseline", "not_higher"),
    Claim("hash", "Roller et al. 2021", "hash routing does as well as learned routing (Hash Layers)", "hash", "topk",
          "not_higher"),
)

CLAIM_ENTRIES: tuple[str, ...] = tuple(dict.fromkeys(n for c in CLAIMS for n in (c.entry, c.baseline)))


def is_seen(gap: float, spread: float) -> bool:
    """The leaderboard's rule: a gap counts only when it exceeds twice the spread."""
    return abs(gap) > 2 * spread


def compare(rows: list[dict[str, Any]], claims: tuple[Claim, ...] = CLAIMS) -> list[dict[str, Any]]:
    """Each claim read against the leaderboard rows (one per entry; `val_loss` the mean over seeds, `val_loss_std`
    the sample std, `n_seeds` the seeds; a single-seed row counts as 1 seed). Returns one dict per claim:
    the means, gap, spread, `verdict` ("seen", "not seen", "n/a (1 seed)", "n/a (not run)") and `reading`
    (agrees / contradicted / undecided / consistent within the spread)."""
    by = {r["router"]: r for r in rows}
    out = []
    for c in claims:
        res: dict[str, Any] = {"claim": c.key, "paper": c.paper, "text": c.text, "entry": c.entry,
                               "baseline": c.baseline, "expect": c.expect, "cheaper": c.cheaper}
        a, b = by.get(c.entry), by.get(c.baseline)
        if a is None or b is None:
            out.append({**res, "verdict": "n/a (not run)", "reading": None})
            continue
        n = min(a.get("n_seeds", 1), b.get("n_seeds", 1))
        gap = a["val_loss"] - b["val_loss"]
        res.update({"entry_loss": a["val_loss"], "baseline_loss": b["val_loss"], "gap": gap, "n_seeds": n,
                    "entry_mflops": a["active_flops_per_token"] / 1e6,
                    "baseline_mflops": b["active_flops_per_token"] / 1e6})
        if n < 2:
            out.append({**res, "spread": None, "verdict": "n/a (1 seed)", "reading": None})
            continue
        sp = max(a["val_loss_std"], b["val_loss_std"])
        seen = is_seen(gap, sp)
        res.update({"spread": sp, "verdict": "seen" if seen else "not seen"})
        if seen and gap > 0:
            reading = "contradicted (higher loss)"
        elif seen:
            reading = "agrees"
        else:
            reading = "undecided" if c.expect == "lower" else "consistent (gap within 2x spread)"
        if c.cheaper and a["active_flops_per_token"] >= b["active_flops_per_token"] and reading != "undecided":
            reading = "contradicted (not fewer FLOPs)"
        res["reading"] = reading
        out.append(res)
    return out


def render_claims(results: list[dict[str, Any]]) -> list[str]:
    """The claim table of leaderboard.md (markdown lines)."""
    lines = [
        "## Paper claims",
        "",
        "gap = mean val loss of the entry - of the baseline; spread = the larger of the two sample stds over "
        "seeds; **seen** only when |gap| > 2 x spread.",
        "",
        "| claim | entry | baseline | entry loss | baseline loss | gap | spread | verdict | reading | "
        "MFLOPs/token (entry / baseline) |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in results:
        fl = (f"{r['entry_mflops']:.3f} / {r['baseline_mflops']:.3f}" if "entry_mflops" in r else "-")
        lines.append(
            f"| {r['text']} ({r['paper']}) | {r['entry']} | {r['baseline']} | {f(r.get('entry_loss'))} | "
            f"{f(r.get('baseline_loss'))} | {f(r.get('gap'))} | {f(r.get('spread'))} | {r['verdict']} | "
            f"{r['reading'] or '-'} | {fl} |"
        )
    return lines
