"""Run every registered router through an MoE layer on the same random data and summarise (`moekit demo`)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from moekit.layers.experts import Experts
from moekit.layers.moe import MoE
from moekit.routing.registry import build_router, list_routers


@dataclass
class RouterSummary:
    """One router's behaviour on the survey batch."""

    router: str
    active_per_token: float  # mean number of real experts per token
    max_over_mean_load: float  # busiest expert's token-slots over the mean
    dropped_pct: float  # % of token-slots dropped by capacity
    ms: float  # median forward time of the whole layer, milliseconds


def survey_routers(
    *,
    routers: list[str] | None = None,
    dim: int = 128,
    num_experts: int = 8,
    hidden: int = 256,
    tokens: int = 2048,
    repeats: int = 5,
    seed: int = 0,
) -> list[RouterSummary]:
    """Build `MoE(router=name, experts=Experts(...))` for each router with its default arguments,
    route the same `tokens` random inputs (eval mode) and time the layer's forward."""
    names = routers or list_routers()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g)
    token_ids = torch.randint(0, 32_000, (tokens,), generator=g)
    out = []
    for name in names:
        torch.manual_seed(seed)
        moe = MoE(
            router=build_router(name, dim=dim, num_experts=num_experts),
            experts=Experts(num_experts=num_experts, dim=dim, hidden=hidden),
        ).eval()
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                _, routing = moe(x, token_ids=token_ids)
                times.append((time.perf_counter() - t0) * 1e3)
        s = routing.stats()
        out.append(
            RouterSummary(
                router=name,
                active_per_token=s["active_per_token"],
                max_over_mean_load=s["max_over_mean_load"],
                dropped_pct=100.0 * s["dropped_frac"],
                ms=statistics.median(times[1:]),
            )
        )
    return out
