"""Branch-Train-Mix: several dense LMs branched from one seed and trained on different domains, mixed into one MoE.

Sukhbaatar et al. 2024, "Branch-Train-MiX: Mixing Expert LLMs into a Mixture-of-Experts LLM": (1) branch: copy a
seed LM N times; (2) train: train each copy on its own domain, in parallel (`moekit train --init SEED ...` makes
them); (3) mix: in every block the N branches' feed-forwards become the N experts of an MoE layer, every other
parameter (embeddings, attention, norms, output head) is the average of the branches', and a new top-k router
(softmax, top-k, renormalised; load-balance loss) learns token-level routing in a final MoE fine-tuning on all
domains (`moekit train --init DST`).

With N identical branches and any router the mixed model computes exactly the branch (the k renormalised weights
of identical experts sum to one). Branches must share one architecture; branches of moekit runs must also come
from one seed, which `moekit train --init SEED` records in each run's config.json (`init`): branches that record
different seeds (or none) are refused, as their averaged attention would be meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.convert.compose import average_state, check_same_architecture, compose
from moekit.convert.source import DenseSource
from moekit.models import MoELM
from moekit.utils.checks import check_positive_ints


@dataclass
class BTXConfig:
    """How the branches are mixed."""

    k: int = 2  # experts (branches' FFNs) each token uses; 1 <= k <= number of branches (BTX: top-2)
    router_std: float = 0.02  # std of the normal init of the router rows; 0 = zero router (uniform weights)
    load_balance: float = 1e-2  # load-balance loss coefficient of the new routers (BTX trains with one)
    z_loss: float = 0.0  # router z-loss coefficient of the new routers
    seed: int = 0  # seeds the router init

    def __post_init__(self) -> None:
        check_positive_ints("BTXConfig.", k=self.k)
        for name in ("router_std", "load_balance", "z_loss"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"BTXConfig.{name} must be a finite number >= 0, got {v!r}")


def check_one_seed(sources: Sequence[DenseSource]) -> str | None:
    """The seed the branches were trained from (`init` in their config.json, resolved), or None when no branch is
    a run (models given directly); a ValueError when they name different seeds or some name none."""
    inits = []
    for s in sources:
        init = s.meta.get("init")
        inits.append(None if init is None else str(Path(init).resolve()))
    if all(s.run_dir is None and not s.meta for s in sources):
        return None
    if len(set(inits)) != 1 or inits[0] is None:
        named = ", ".join(f"{s.origin}: {i or 'no seed (not trained with --init)'}" for s, i in
                          zip(sources, inits, strict=True))
        raise ValueError(f"btx: the branches must be trained from one seed (moekit train --init SEED); got {named}")
    return inits[0]


@torch.no_grad()
def btx(branches: Sequence[MoELM], cfg: BTXConfig | None = None) -> MoELM:
    """The BTX mix of `branches` (dense LMs of one architecture, left unchanged): expert e of every block is
    branch e's FFN, every other tensor the mean of the branches', routers new (`cfg`)."""
    cfg = cfg or BTXConfig()
    if len(branches) < 2:
        raise ValueError(f"btx: give at least 2 branches, got {len(branches)}")
    check_same_architecture(branches, "btx")
    if cfg.k > len(branches):
        raise ValueError(f"BTXConfig.k must be in [1, number of branches={len(branches)}], got {cfg.k}")
    args = {"k": cfg.k, "order": "softmax_topk", "normalize": True, "load_balance": cfg.load_balance,
            "z_loss": cfg.z_loss}
    model = compose(branches, average_state(branches), router="topk", router_args=args, who="btx")
    gen = torch.Generator().manual_seed(cfg.seed)
    for block in model.layers:
        w = block.mlp.router.weight
        w.copy_((torch.randn(w.shape, generator=gen) * cfg.router_std).to(w.dtype))
    return model
