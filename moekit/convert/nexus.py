"""Nexus: dense domain experts upcycled into an MoE whose router is a projection of domain embeddings, so an expert
trained later is added with its domain embedding and no router retraining.

Gritsch et al. 2024, "Nexus: Specialization meets Adaptability for Efficiently Training Mixture of Experts": dense
models branched from one seed and trained on one domain each become the experts (as in Branch-Train-Mix, the other
parameters averaged); the seed's FFN stays as a shared expert that every token uses; each expert's router row is
P(d_e), a learned projection of the embedding d_e of its domain's data (the `nexus` router,
`moekit.routing.nexus`). After the MoE is trained, `add_expert` appends a new domain's expert: its FFN from a new
dense model and its domain embedding, through the trained projection. The old experts' scores are unchanged, so a
token whose top-k does not include the new expert is routed exactly as before.

moekit's domain embedding (`domain_embedding`) is the mean over the domain's tokens of a model's final hidden state
(after its last norm): the LM itself as the embedding model (the paper embeds the domain's documents with a separate
embedding model and averages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.convert.compose import FFN, average_state, check_same_architecture, compose
from moekit.layers.surgery import add_experts, replace_expert
from moekit.models import MoELM
from moekit.utils.checks import check_positive_ints


@dataclass
class NexusConfig:
    """How the dense domain experts are upcycled with a Nexus router."""

    k: int = 1  # routed experts per token (Nexus: top-1, next to the shared expert); 1 <= k <= experts
    shared_seed: bool = True  # keep the seed model's FFN as a shared expert (needs the seed model)
    proj_hidden: int | None = None  # hidden width of the router's projection (None: the model width D)
    load_balance: float = 1e-2  # load-balance loss coefficient of the routers
    seed: int = 0  # seeds the projections' init

    def __post_init__(self) -> None:
        check_positive_ints("NexusConfig.", k=self.k)
        if self.proj_hidden is not None:
            check_positive_ints("NexusConfig.", proj_hidden=self.proj_hidden)
        if isinstance(self.load_balance, bool) or not isinstance(self.load_balance, int | float) or not (
                math.isfinite(self.load_balance) and self.load_balance >= 0):
            raise ValueError(f"NexusConfig.load_balance must be a finite number >= 0, got {self.load_balance!r}")


@torch.no_grad()
def domain_embedding(model: MoELM, batches: Sequence[Tensor]) -> Tensor:
    """The mean over every token of `batches` (LongTensor [B, L] each) of `model`'s final hidden state, after its
    last norm: a [D] embedding of the domain the batches come from."""
    if not batches:
        raise ValueError("domain_embedding: give at least one batch of token ids")
    total, count = None, 0
    states: list[Tensor] = []
    hook = model.norm.register_forward_hook(lambda _m, _i, o: states.append(o.detach().float()))
    was = model.training
    try:
        model.eval()
        for ids in batches:
            states.clear()
            model(ids)
            s = states[-1].reshape(-1, states[-1].shape[-1])
            total = s.sum(0) if total is None else total + s.sum(0)
            count += s.shape[0]
    finally:
        hook.remove()
        model.train(was)
    return total / count


def _embeddings(domain_embeddings: Tensor | Sequence[Tensor], n: int) -> Tensor:
    d = torch.stack(list(domain_embeddings)) if not isinstance(domain_embeddings, Tensor) else domain_embeddings
    if d.dim() != 2 or d.shape[0] != n:
        raise ValueError(f"nexus: domain_embeddings must be [E={n}, H] (one per expert), got {tuple(d.shape)}")
    if not torch.isfinite(d).all():
        raise ValueError("nexus: domain_embeddings hold NaN or inf")
    return d.float()


@torch.no_grad()
def nexus(experts: Sequence[MoELM], domain_embeddings: Tensor | Sequence[Tensor], *, seed_model: MoELM | None = None,
          cfg: NexusConfig | None = None) -> MoELM:
    """A Nexus MoE: expert e of every block is `experts[e]`'s FFN, the rest the mean of the experts' (dense LMs of
    one architecture, branched from `seed_model`), the seed's FFN a shared expert (`cfg.shared_seed`), and `nexus`
    routers whose domain embeddings are `domain_embeddings` ([E, H], one row per expert)."""
    cfg = cfg or NexusConfig()
    if len(experts) < 1:
        raise ValueError("nexus: give at least one dense expert model")
    if cfg.k > len(experts):
        raise ValueError(f"NexusConfig.k must be in [1, number of experts={len(experts)}], got {cfg.k}")
    if cfg.shared_seed and seed_model is None:
        raise ValueError("nexus: NexusConfig.shared_seed needs the seed model (seed_model=...); or set it to False")
    d = _embeddings(domain_embeddings, len(experts))
    check_same_architecture([*experts, *([seed_model] if seed_model is not None else [])], "nexus")
    args = {"k": cfg.k, "embed_dim": d.shape[1], "proj_hidden": cfg.proj_hidden, "normalize": True,
            "load_balance": cfg.load_balance}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = compose(experts, average_state(experts), router="nexus", router_args=args,
                        shared=seed_model if cfg.shared_seed else None, who="nexus")
    for block in model.layers:
        router = block.mlp.router
        router.domain_embeddings.copy_(d.to(router.domain_embeddings.dtype))
    return model


def _block_ffn(ffn: MoELM | Sequence[nn.Module | dict[str, Tensor]], i: int) -> nn.Module | dict[str, Tensor]:
    """Block i's new expert: the FFN of dense model `ffn`, or the i-th of a per-block list (MLP or tensors)."""
    if isinstance(ffn, MoELM):
        return ffn.layers[i].mlp
    return ffn[i]


@torch.no_grad()
def add_expert(model: MoELM, ffn_weights: MoELM | Sequence[nn.Module | dict[str, Tensor]],
               domain_embedding: Tensor) -> int:
    """Append one expert to every MoE block of a Nexus `model`, in place: its FFN from `ffn_weights` (a dense LM of
    the model's architecture, e.g. a new branch of the same seed, or one MLP / tensor dict per block, as
    `replace_expert` takes) and its router row from `domain_embedding` [H] through each router's trained
    projection (expert-set surgery: `add_experts`, then `replace_expert`). Returns the new expert's id."""
    cfg = model.config
    if cfg.router != "nexus":
        raise ValueError(f"add_expert: the model's router is {cfg.router!r}, expected 'nexus' (moekit convert nexus)")
    if isinstance(ffn_weights, MoELM):
        dense = ffn_weights.config
        if dense.num_experts or dense.dim != cfg.dim or dense.ffn_hidden != cfg.expert_hidden:
            raise ValueError(f"add_expert: the new expert's model must be dense with dim {cfg.dim} and ffn_hidden "
                             f"{cfg.expert_hidden}; got num_experts {dense.num_experts}, dim {dense.dim}, "
                             f"ffn_hidden {dense.ffn_hidden}")
        for b in ffn_weights.layers:
            if not all(hasattr(b.mlp, n.split(".")[0]) for n in FFN):
                raise ValueError("add_expert: the new expert's model must have gated FFNs")
    elif len(ffn_weights) != cfg.n_layers:
        raise ValueError(f"add_expert: give one FFN per block ({cfg.n_layers}), got {len(ffn_weights)}")
    d = torch.as_tensor(domain_embedding).float().reshape(-1)
    blocks = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    H = model.layers[blocks[0]].mlp.router.domain_embeddings.shape[1]
    if d.numel() != H or not torch.isfinite(d).all():
        raise ValueError(f"add_expert: domain_embedding must be a finite [{H}] vector, got {tuple(d.shape)}")
    E = cfg.num_experts
    for i in blocks:
        layer = model.layers[i].mlp
        add_experts(layer, 1, "zeros")
        layer.router.domain_embeddings[E] = d.to(layer.router.domain_embeddings.dtype)
        replace_expert(layer, E, _block_ffn(ffn_weights, i))
    model.config = cfg.replace(num_experts=E + 1)
    return E
