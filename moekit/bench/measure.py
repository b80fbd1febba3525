"""Measuring a trained leaderboard model: validation loss per domain, routing statistics and active FLOPs.

Mutual information between experts and domains comes from `moekit.analyze` (the same function the routing
analysis reports, here in bits); the routed experts' compute comes from each experts variant's own
`flops_per_token`, so no experts variant is named here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moekit.analyze.metrics.specialization import mutual_information
from moekit.models import LMConfig, MoELM, count_params
from moekit.train.report import read_jsonl


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
    expert_flops_per_token: float  # routed-expert forward FLOPs per token, summed over MoE layers
    depth_fractions: dict[int, float] = field(default_factory=dict)  # MoD block -> share of the tokens it processed


def routed_experts(model: MoELM, layer: int) -> nn.Module:
    """The routed experts of block `layer` (an MoE block)."""
    return model.layers[layer].mlp.experts


def expert_domain_mi_bits(joint: torch.Tensor) -> float:
    """I(expert; domain) in bits of a [domains, E] count table (moekit.analyze's mutual information)."""
    return mutual_information(joint.T.numpy(), base=2)[0]


@torch.no_grad()
def measure(model: MoELM, windows: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> RoutingMeasure:
    """One eval-mode pass over the validation windows: loss per domain and routing statistics."""
    model.eval()
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
        mi.append(expert_domain_mi_bits(joint))
        # per model token (MoD blocks route a subset)
        flops += routed_experts(model, j).flops_per_token(load, max(total_tok, 1))
    avg = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    n_slots = sum(slots.values())
    return RoutingMeasure(
        loss=total_loss / max(total_tok, 1), loss_per_domain=losses, active_experts=avg(active),
        load_max_over_mean=avg(lmm), load_cv=avg(cv), dropped_frac=sum(dropped.values()) / n_slots if n_slots else 0.0,
        expert_domain_mi=avg(mi), expert_flops_per_token=flops,
        depth_fractions={j: c / max(total_tok, 1) for j, c in processed.items()},
    )


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


def tokens_per_s(run_dir: Path) -> float:
    """Median training throughput of a run (train.jsonl), leaving out the first step's warm-up."""
    log = read_jsonl(run_dir / "train.jsonl")
    vals = sorted(r["tokens_per_s"] for r in (log[1:] or log))  # the first step pays for warm-up
    return vals[len(vals) // 2] if vals else float("nan")  # median: robust to the noisy shared machine
