"""MoEfication: split each dense feed-forward into experts of neurons that fire together.

Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts": the F neurons of a
dense FFN are partitioned into E experts of F/E neurons each, by balanced k-means (`moekit.convert.cluster`)
either on the neurons' weights (parameter clustering: each neuron's gate and up rows, unit-normalised) or on
their activation patterns over calibration tokens (co-activation: each neuron's activations over the same
tokens, unit-normalised). With every expert active and weight 1 the split FFN is the dense FFN, neuron for
neuron (`split_ffn`). A router then predicts, per token, the k experts holding the largest activations (the
norm of an expert's intermediate activation `act(gate x) * (up x)`); it is trained alone, on the dense model's
FFN inputs, with the cross-entropy of its softmax against the true top-k set (uniform over it).

moekit routes with its `topk` router (softmax, top-k, renormalised, times `routed_scale=k`). MoEfication sums
the chosen experts unweighted; to stay close to that, the trained router's rows are scaled down by one
positive factor per layer (the top-k choices do not change) until its k renormalised weights are within
`weight_tolerance` of 1/k on the calibration tokens, so each chosen expert starts with weight ~1 and continued
training (`moekit train --init`) can still sharpen the router by gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit.convert.cluster import balanced_kmeans
from moekit.convert.source import check_dense
from moekit.layers import MLP
from moekit.models import LMConfig, MoELM
from moekit.utils.checks import check_positive_ints

CLUSTERINGS = ("activations", "weights")


@dataclass
class SplitConfig:
    """How a dense LM's FFNs are split into experts."""

    num_experts: int = 8  # E experts per FFN, of width F/E (E must divide ffn_hidden)
    k: int = 2  # experts each token uses after the split, 1 <= k <= E (k = E: exactly the dense model)
    cluster: str = "activations"  # what neurons are clustered on: "activations" (calibration data) | "weights"
    kmeans_iters: int = 25  # balanced k-means iterations (it stops earlier when the assignment settles)
    max_tokens: int = 4096  # calibration tokens kept per layer (for clustering and router training)
    router_steps: int = 200  # Adam steps of router training per layer (0: zero router, uniform weights)
    router_lr: float = 1e-2  # learning rate of router training
    weight_tolerance: float = 0.05  # largest relative deviation of a chosen expert's weight from 1 after scaling
    load_balance: float = 1e-2  # load-balance loss coefficient of the routers (for continued training)
    seed: int = 0  # seeds k-means and token subsampling

    def __post_init__(self) -> None:
        check_positive_ints("SplitConfig.", num_experts=self.num_experts, k=self.k, kmeans_iters=self.kmeans_iters,
                            max_tokens=self.max_tokens)
        if self.k > self.num_experts:
            raise ValueError(f"SplitConfig.k must be in [1, num_experts={self.num_experts}], got {self.k}")
        if self.cluster not in CLUSTERINGS:
            raise ValueError(f"SplitConfig.cluster must be one of {list(CLUSTERINGS)}, got {self.cluster!r}")
        if not isinstance(self.router_steps, int) or self.router_steps < 0:
            raise ValueError(f"SplitConfig.router_steps must be an integer >= 0, got {self.router_steps!r}")
        if not self.router_lr > 0:
            raise ValueError(f"SplitConfig.router_lr must be > 0, got {self.router_lr!r}")
        if not 0 < self.weight_tolerance < 1:
            raise ValueError(f"SplitConfig.weight_tolerance must be in (0, 1), got {self.weight_tolerance!r}")
        if not (math.isfinite(self.load_balance) and self.load_balance >= 0):
            raise ValueError(f"SplitConfig.load_balance must be a finite number >= 0, got {self.load_balance!r}")

    @property
    def needs_data(self) -> bool:
        """Whether the split reads calibration tokens (activation clustering or router training)."""
        return self.cluster == "activations" or self.router_steps > 0


@dataclass
class SplitReport:
    """What a split found, per block."""

    clusters: dict[int, list[int]] = field(default_factory=dict)  # block -> expert of each dense neuron [F]
    router_recall: dict[int, float] = field(default_factory=dict)  # block -> share of true top-k experts picked
    # block -> the same share for a constant guess (the k experts most often in the true top-k): what the router's
    # recall must beat to have learnt anything from the tokens (high when a few experts hold most activation)
    constant_recall: dict[int, float] = field(default_factory=dict)


def intermediate(mlp: MLP, x: Tensor) -> Tensor:
    """The dense FFN's neuron activations act(gate x) * (up x): x [T, D] -> [T, F]."""
    return mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)


def split_ffn(mlp: MLP, labels: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """A gated dense MLP's neurons grouped by `labels [F]` (expert of each neuron, E equal groups) into fused
    expert weights (gate_up_proj [E, 2F/E, D], down_proj [E, D, F/E]); neurons keep their order in an expert."""
    F_ = mlp.hidden
    if labels.shape != (F_,):
        raise ValueError(f"split_ffn: expected labels [{F_}], got {tuple(labels.shape)}")
    counts = torch.bincount(labels, minlength=num_experts)
    if len(counts) != num_experts or not bool((counts == F_ // num_experts).all()) or F_ % num_experts:
        raise ValueError(f"split_ffn: labels must put {F_ // num_experts} neurons in each of {num_experts} experts, "
                         f"got counts {counts.tolist()}")
    idx = torch.argsort(labels, stable=True).view(num_experts, -1)  # [E, F/E] neuron ids
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate_up = torch.cat([gate[idx], up[idx]], dim=1)  # [E, 2F/E, D]
    return gate_up, down[:, idx].permute(1, 0, 2)  # [E, D, F/E]


def neuron_features(mlp: MLP, x: Tensor | None, cluster: str) -> Tensor:
    """[F, d] unit-norm features the neurons are clustered on: weights (gate and up rows) or activations over
    the tokens x [T, D]."""
    if cluster == "weights":
        feats = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1)  # [F, 2D]
    else:
        if x is None:
            raise ValueError("split: cluster='activations' needs calibration data")
        feats = intermediate(mlp, x).T  # [F, T]
    return torch.nn.functional.normalize(feats.float(), dim=1)


def expert_scores(gate_up: Tensor, x: Tensor, mlp: MLP) -> Tensor:
    """[T, E]: the norm of each expert's intermediate activation for tokens x [T, D]."""
    f = gate_up.shape[1] // 2
    h = torch.einsum("td,efd->tef", x, gate_up)  # [T, E, 2f]
    return (mlp.act(h[..., :f]) * h[..., f:]).norm(dim=-1)


def train_router(x: Tensor, scores: Tensor, k: int, cfg: SplitConfig) -> tuple[Tensor, float, float]:
    """Router rows W [E, D] fitted on tokens x [T, D] to put softmax mass on each token's top-k experts by
    `scores [T, E]`; returns (W, recall: share of the true top-k sets the trained router's top-k recovers,
    the recall of always guessing the k experts most often in the true top-k)."""
    E = scores.shape[1]
    target = torch.zeros_like(scores).scatter_(1, scores.topk(k, dim=1).indices, 1.0 / k)  # [T, E]
    w = torch.zeros(E, x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=cfg.router_lr)
    xf = x.float()
    with torch.enable_grad():
        for _ in range(cfg.router_steps):
            loss = -(target * torch.log_softmax(xf @ w.T, dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = w.detach()
    picked = torch.zeros_like(scores).scatter_(1, (xf @ w.T).topk(k, dim=1).indices, 1.0)
    truth = target > 0
    recall = float((picked * truth).sum() / truth.sum())
    constant = float(truth.sum(0).topk(k).values.sum() / truth.sum())
    return w, recall, constant


def flatten_weights(w: Tensor, x: Tensor, k: int, tolerance: float) -> Tensor:
    """w [E, D] scaled by one factor in (0, 1] so that on tokens x [T, D] the k renormalised softmax weights of
    the top-k experts are all within `tolerance` of 1/k (relative); the top-k choice is unchanged."""
    logits = x.float() @ w.T  # [T, E]
    top = logits.topk(k, dim=1).values
    spread = float((top.max(1).values - top.min(1).values).max()) if k > 1 else 0.0
    # weights in [1/k e^{-s}, 1/k e^{s}] roughly for a logit spread s: keep s below log(1 + tolerance)
    limit = math.log1p(tolerance) / 2
    return w * min(1.0, limit / spread) if spread > 0 else w


def split_config(dense: LMConfig, cfg: SplitConfig) -> LMConfig:
    """The LMConfig of the split model: E experts of width F/E, top-k with weights ~1 (routed_scale k)."""
    if dense.ffn_hidden % cfg.num_experts:
        raise ValueError(f"SplitConfig.num_experts={cfg.num_experts} must divide the dense FFN width "
                         f"ffn_hidden={dense.ffn_hidden}")
    args = {"k": cfg.k, "order": "softmax_topk", "normalize": True, "routed_scale": float(cfg.k),
            "load_balance": cfg.load_balance}
    return dense.replace(num_experts=cfg.num_experts, expert_hidden=dense.ffn_hidden // cfg.num_experts,
                         router="topk", router_args=args, num_shared_experts=0, shared_gate=False,
                         first_k_dense=0, moe_every=1)


@torch.no_grad()
def ffn_inputs(model: MoELM, batches: Iterable[Tensor], max_tokens: int, seed: int = 0) -> dict[int, Tensor]:
    """block -> [<= max_tokens, D] inputs of its feed-forward over the calibration `batches` ([B, L] ids),
    a seeded random subset when there are more."""
    got: dict[int, list[Tensor]] = {i: [] for i in range(len(model.layers))}
    hooks = [block.mlp.register_forward_pre_hook(lambda _m, args, i=i: got[i].append(args[0].reshape(
        -1, args[0].shape[-1]).detach())) for i, block in enumerate(model.layers)]
    was = model.training
    model.eval()
    try:
        for ids in batches:
            model(ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, parts in got.items():
        if not parts:
            raise ValueError("split: the calibration batches are empty")
        x = torch.cat(parts)
        out[i] = x[torch.randperm(len(x), generator=gen)[:max_tokens]] if len(x) > max_tokens else x
    return out


@torch.no_grad()
def split(dense: MoELM, cfg: SplitConfig | None = None, batches: Iterable[Tensor] | None = None
          ) -> tuple[MoELM, SplitReport]:
    """MoEfy dense LM `dense` (left unchanged): every block's FFN split into `cfg.num_experts` clustered experts
    with a trained router; `batches` (LongTensor [B, L] each) are the calibration data (needed for activation
    clustering and router training; without them and with `cluster="weights"` the router is zero, uniform)."""
    cfg = cfg or SplitConfig()
    check_dense(dense, "split")
    new_cfg = split_config(dense.config, cfg)
    if cfg.cluster == "activations" and batches is None:
        raise ValueError("split: cluster='activations' needs calibration data (batches)")
    xs = ffn_inputs(dense, batches, cfg.max_tokens, cfg.seed) if batches is not None else {}
    model = MoELM(new_cfg).to(dtype=next(dense.parameters()).dtype)
    src, out = dense.state_dict(), model.state_dict()
    for key, t in out.items():
        if ".mlp." not in key and key in src:
            t.copy_(src[key])
    report = SplitReport()
    E = cfg.num_experts
    for i, block in enumerate(model.layers):
        if "mlp" not in block._modules:  # WideNet: shares block 0's
            continue
        mlp = dense.layers[i].mlp
        x = xs.get(i)
        labels = balanced_kmeans(neuron_features(mlp, x, cfg.cluster), E, iters=cfg.kmeans_iters,
                                 seed=cfg.seed + i)
        gate_up, down = split_ffn(mlp, labels, E)
        block.mlp.experts.gate_up_proj.copy_(gate_up)
        block.mlp.experts.down_proj.copy_(down)
        w = torch.zeros_like(block.mlp.router.weight)
        if x is not None and cfg.router_steps:
            scores = expert_scores(gate_up, x.to(gate_up.dtype), mlp)
            w, report.router_recall[i], report.constant_recall[i] = train_router(x, scores, cfg.k, cfg)
            w = flatten_weights(w, x, cfg.k, cfg.weight_tolerance)
        block.mlp.router.weight.copy_(w)
        report.clusters[i] = labels.tolist()
    return model.train(dense.training), report
