"""Sparse upcycling: a dense LM's feed-forwards become MoE layers whose experts start as copies of them.

Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints": every expert
is a copy of the dense FFN, the router is new, everything else is copied; with top-k weights that sum to one
over identical experts the upcycled model computes exactly the dense model at the start. CuMo (Li et al. 2024,
"CuMo: Scaling Multimodal LLM with Co-Upcycled Mixture-of-Experts") trains such upcycled layers with the
load-balance and router z-losses (`load_balance`, `z_loss` here).

Options that break the symmetry of the copies (and so the exact equality at the start):
- `noise`: each copy plus Gaussian noise of `noise` x the std of the weight it perturbs;
- `reinit`: Drop-Upcycling (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with
  Partial Re-initialization"): in each expert a random fraction `reinit` of the F neurons (their gate and up
  rows and down column) is redrawn from a normal with the mean and std of the dense weight.

Fine-grained ("granular") upcycling, He et al. 2024, "Upcycling Large Language Models into Mixture of Experts"
(virtual-group initialisation): each copy is cut into G slices of width F/G (neurons [g F/G, (g+1) F/G)),
giving E*G experts of which k*G are active. The router rows of the G slices of one copy are the same row, so a
token picks whole copies; the renormalised weight of each slice is then p_copy / (G sum p), and a routed scale
of G makes the layer output equal the dense FFN again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.convert.source import check_dense
from moekit.models import LMConfig, MoELM
from moekit.utils.checks import check_positive_ints


@dataclass
class UpcycleConfig:
    """How a dense LM is upcycled."""

    num_experts: int = 8  # E copies of the dense FFN per MoE layer (E*G experts with granularity G)
    k: int = 2  # copies each token uses (k*G slices with granularity G); 1 <= k <= E
    granularity: int = 1  # G: cut each copy into G slices of width F/G (G must divide the dense width F)
    router_std: float = 0.02  # std of the normal init of the router rows; 0 = zero router (uniform weights)
    noise: float = 0.0  # relative std of Gaussian noise added to each copy (0: exact copies)
    reinit: float = 0.0  # Drop-Upcycling: fraction of each expert's neurons redrawn, in [0, 1) (0: none)
    load_balance: float = 1e-2  # load-balance loss coefficient of the new routers (CuMo: on)
    z_loss: float = 1e-3  # router z-loss coefficient of the new routers (CuMo: on)
    first_k_dense: int = 0  # keep the first k blocks dense (DeepSeek-style); their FFNs are copied as they are
    moe_every: int = 1  # upcycle every n-th block after first_k_dense (1 = all)
    seed: int = 0  # seeds the router init, the noise and the re-initialised neurons

    def __post_init__(self) -> None:
        check_positive_ints("UpcycleConfig.", num_experts=self.num_experts, k=self.k, granularity=self.granularity,
                            moe_every=self.moe_every)
        if self.k > self.num_experts:
            raise ValueError(f"UpcycleConfig.k must be in [1, num_experts={self.num_experts}], got {self.k}")
        for name in ("router_std", "noise", "load_balance", "z_loss"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"UpcycleConfig.{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.reinit, int | float) and 0 <= self.reinit < 1):
            raise ValueError(f"UpcycleConfig.reinit must be in [0, 1), got {self.reinit!r}")
        if not isinstance(self.first_k_dense, int) or self.first_k_dense < 0:
            raise ValueError(f"UpcycleConfig.first_k_dense must be an integer >= 0, got {self.first_k_dense!r}")
        if self.granularity > 1 and self.router_std == 0:
            raise ValueError(
                "UpcycleConfig.router_std must be > 0 when granularity > 1: a zero router ties all E*G slices and "
                "top-k could pick slices of different copies, so the output would not start equal to the dense FFN"
            )

    @property
    def exact(self) -> bool:
        """Whether the upcycled model starts equal to the dense one (no noise, no re-initialised neurons)."""
        return self.noise == 0 and self.reinit == 0


def moe_config(dense: LMConfig, cfg: UpcycleConfig) -> LMConfig:
    """The LMConfig of the upcycled model: the dense one with E*G top-(k*G) experts of width F/G."""
    G = cfg.granularity
    if dense.ffn_hidden % G:
        raise ValueError(f"UpcycleConfig.granularity={G} must divide the dense FFN width ffn_hidden={dense.ffn_hidden}")
    if cfg.first_k_dense > dense.n_layers:
        raise ValueError(f"UpcycleConfig.first_k_dense must be in [0, n_layers={dense.n_layers}], got "
                         f"{cfg.first_k_dense}")
    args = {"k": cfg.k * G, "order": "softmax_topk", "normalize": True, "load_balance": cfg.load_balance,
            "z_loss": cfg.z_loss}
    if G > 1:
        args["routed_scale"] = float(G)
    return dense.replace(num_experts=cfg.num_experts * G, expert_hidden=dense.ffn_hidden // G, router="topk",
                         router_args=args, num_shared_experts=0, shared_gate=False,
                         first_k_dense=cfg.first_k_dense, moe_every=cfg.moe_every)


def expert_weights(gate: Tensor, up: Tensor, down: Tensor, num_slices: int) -> tuple[Tensor, Tensor]:
    """A dense gated FFN (gate, up [F, D], down [D, F]) cut into `num_slices` experts of F/G neurons:
    (gate_up_proj [G, 2F/G, D] (gate rows, then up rows), down_proj [G, D, F/G])."""
    F_, D = gate.shape
    f = F_ // num_slices
    gate_s, up_s = gate.view(num_slices, f, D), up.view(num_slices, f, D)
    down_s = down.view(D, num_slices, f).permute(1, 0, 2)  # [G, D, f]
    return torch.cat([gate_s, up_s], dim=1), down_s


def _perturb(w: Tensor, cfg: UpcycleConfig, gen: torch.Generator) -> Tensor:
    """w [E, ...] plus noise of relative std `cfg.noise` (per expert, std of w)."""
    if not cfg.noise:
        return w
    std = w.float().std()
    return w + (torch.randn(w.shape, generator=gen) * std * cfg.noise).to(w.dtype)


def _reinit(gate_up: Tensor, down: Tensor, gate: Tensor, up: Tensor, dense_down: Tensor, cfg: UpcycleConfig,
            gen: torch.Generator) -> None:
    """Drop-Upcycling, in place: per copy, redraw a fraction `cfg.reinit` of its neurons (gate_up [E, 2F, D],
    down [E, D, F], before slicing) from normals with the dense weights' mean and std."""
    E, two_f, _ = gate_up.shape
    F_ = two_f // 2
    n = int(round(cfg.reinit * F_))
    if n == 0:
        return
    for e in range(E):
        idx = torch.randperm(F_, generator=gen)[:n]
        for rows, src in ((idx, gate), (idx + F_, up)):
            gate_up[e, rows] = torch.normal(float(src.mean()), float(src.std()), (n, src.shape[1]), generator=gen
                                            ).to(gate_up.dtype)
        down[e][:, idx] = torch.normal(float(dense_down.mean()), float(dense_down.std()), (down.shape[1], n),
                                       generator=gen).to(down.dtype)


@torch.no_grad()
def upcycle(dense: MoELM, cfg: UpcycleConfig | None = None) -> MoELM:
    """A new MoE LM from dense LM `dense` (left unchanged): attention, norms and embeddings copied; every MoE
    block's experts copies of that block's FFN (sliced with granularity G), routers new. With `cfg.exact` its
    logits equal the dense model's at the start (up to float rounding of the weighted sum)."""
    cfg = cfg or UpcycleConfig()
    check_dense(dense, "upcycle")
    new_cfg = moe_config(dense.config, cfg)
    p = next(dense.parameters())
    model = MoELM(new_cfg).to(dtype=p.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    src = dense.state_dict()
    out = model.state_dict()
    filled = set()
    for key, t in out.items():
        if key in src and src[key].shape == t.shape and ".mlp." not in key:
            t.copy_(src[key])
            filled.add(key)
    E, G = cfg.num_experts, cfg.granularity
    for i in range(len(model.layers)):
        pre = f"layers.{i}.mlp."
        if pre + "experts.gate_up_proj" not in out:  # a dense block (or a WideNet block sharing block 0's)
            for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
                if pre + name in out:
                    out[pre + name].copy_(src[pre + name])
                    filled.add(pre + name)
            continue
        gate, up, down = (src[pre + n].float() for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        F_ = gate.shape[0]
        # whole copies [E, 2F, D], [E, D, F] first: noise and re-init act per copy, then the copies are sliced
        gate_up = torch.cat([gate, up], dim=0).expand(E, 2 * F_, gate.shape[1]).clone()
        downs = down.expand(E, *down.shape).clone()
        gate_up, downs = _perturb(gate_up, cfg, gen), _perturb(downs, cfg, gen)
        if cfg.reinit:
            _reinit(gate_up, downs, gate, up, down, cfg, gen)
        slices = [expert_weights(gate_up[e, :F_], gate_up[e, F_:], downs[e], G) for e in range(E)]
        out[pre + "experts.gate_up_proj"].copy_(torch.cat([s[0] for s in slices]))  # expert e*G + g
        out[pre + "experts.down_proj"].copy_(torch.cat([s[1] for s in slices]))
        rows = torch.randn(E, new_cfg.dim, generator=gen) * cfg.router_std  # one row per copy
        out[pre + "router.weight"].copy_(rows.repeat_interleave(G, dim=0))
        filled |= {pre + "experts.gate_up_proj", pre + "experts.down_proj", pre + "router.weight"}
    if new_cfg.tie_embeddings:
        filled.add("lm_head.weight")
    left = sorted(set(out) - filled)
    if left:  # a parameter of the new model that nothing here knows how to fill: refuse, never leave it random
        raise ValueError(f"upcycle: no source for {left[:5]} (is the dense model's config supported?)")
    return model.train(dense.training)
