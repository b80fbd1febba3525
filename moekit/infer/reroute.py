"""Test-time re-routing on any model built from moekit's `MoE` layer (moekit LMs, patched Hugging Face models):
dynamic k at inference, and C3PO-style re-mixing of critical layers' routing weights from reference neighbours.

**Dynamic k** (top-p over a top-k model, as the top-p routing of Huang et al. 2024, "Harder Tasks Need More
Experts: Dynamic Routing in MoE Models", applied at inference only): each token keeps the fewest of its k
chosen experts, highest router probability first, whose probabilities (softmax over the routing's logits,
all E experts) add up to at least the layer's threshold p; the other slots become empty (-1, weight 0). Kept
weights are rescaled to the original slots' weight sum, so a renormalised top-k router stays renormalised.
p = 1 keeps all k: the routing is the top-k routing unchanged.

    with dynamic_k(model, 0.5):            # or {layer: p}
        out = model.generate(prompt, 20)

**C3PO re-mixing** (Li et al. 2025, "C3PO: Critical-Layer, Core-Expert, Collaborative Pathway Optimization
for Test-Time Expert Re-Mixing"): the router's mixing weights of a query are replaced, in a few critical
layers and for the last token, by a kernel-weighted average of the weights that successful reference
queries used. This is the paper's gradient-free *kernel regression* variant, with its notation:
neighbours = the `n_neighbors` references nearest to the query's embedding (here the mean final hidden state
of its tokens, not a separate embedding model), w_i = exp(-||x_i - x||^2 / (2 h^2)) a Gaussian kernel, and
the new weights omega <- omega + lam * (sum_i w_i omega_i / sum_i w_i - omega) (lam = 1 replaces them). A
weight vector omega is dense over the E experts (0 for unchosen ones); the re-mixed token uses the top k of
omega with those weights, rescaled to the token's original weight sum. Not implemented: the paper's
gradient-based variants (which need a loss on the neighbours) and its restriction to the top "core" experts.

    refs = build_references(model, successful_prompts, layers=[1, 2])
    with c3po(model, refs, query_ids):
        out = model.generate(query_ids, 20)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.analyze.trace import moe_layers
from moekit.routing.routing import Routing


def _rebuild(r: Routing, ids: Tensor, w: Tensor) -> Routing:
    return Routing(ids, w, r.logits, r.num_experts, aux=r.aux, dropped=r.dropped, meta=r.meta, state=r.state)


def top_p_routing(routing: Routing, p: float) -> Routing:
    """The routing with each token's slots cut to the fewest, highest router probability first, whose
    probabilities (softmax of `routing.logits` over the E real experts) reach `p`; dropped slots become -1 with
    weight 0, kept weights are rescaled to the token's original weight sum. p = 1 returns the routing as is."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"dynamic k: threshold must be in (0, 1], got {p}")
    if p == 1.0:
        return routing
    ids, w = routing.expert_ids, routing.weights
    probs = torch.softmax(routing.logits[:, : routing.num_experts].float(), dim=-1)  # [T, E]
    slot_p = torch.where(ids >= 0, probs.gather(1, ids.clamp_min(0)), torch.zeros_like(w, dtype=torch.float32))
    order = slot_p.argsort(dim=1, descending=True, stable=True)  # [T, k]
    sorted_p = slot_p.gather(1, order)
    keep_sorted = (sorted_p.cumsum(dim=1) - sorted_p < p) & (sorted_p > 0)  # mass before the slot still short of p
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    total = w.sum(dim=1, keepdim=True)
    kept_w = torch.where(keep, w, torch.zeros_like(w))
    scale = total / kept_w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return _rebuild(routing, torch.where(keep, ids, torch.full_like(ids, -1)), kept_w * scale)


def _layer_map(model: nn.Module, spec: float | dict[int, float], what: str) -> dict[int, float]:
    layers = {idx: moe for idx, _, moe in moe_layers(model)}
    if not layers:
        raise ValueError(f"{what}: the model has no moekit MoE layer")
    if isinstance(spec, int | float):
        spec = {l: float(spec) for l in layers}
    else:
        spec = {int(k): float(v) for k, v in spec.items()}
    bad = sorted(set(spec) - set(layers))
    if bad:
        raise ValueError(f"{what}: layers {bad} are not MoE layers; MoE layers are {sorted(layers)}")
    return spec


@contextmanager
def _wrapped(routers: list[tuple[nn.Module, object]]) -> Iterator[None]:
    """Shadow each router's `forward` with `wrap(previous forward)`; restore the previous attribute on exit
    (so this nests with `steer` and with itself)."""
    saved = []
    try:
        for router, wrap in routers:
            saved.append((router, router.__dict__.get("forward")))
            router.forward = wrap(router.forward)
        yield
    finally:
        for router, prev in reversed(saved):
            if prev is None:
                router.__dict__.pop("forward", None)
            else:
                router.forward = prev


@contextmanager
def dynamic_k(model: nn.Module, threshold: float | dict[int, float]) -> Iterator[nn.Module]:
    """Within the block, MoE layer l routes each token to the fewest of its top-k experts whose router
    probabilities reach `threshold` (one float for every MoE layer, or {layer: p} for some); see `top_p_routing`."""
    spec = _layer_map(model, threshold, "dynamic k")
    for l, p in spec.items():
        if not 0.0 < p <= 1.0:
            raise ValueError(f"dynamic k: layer {l}: threshold must be in (0, 1], got {p}")
    layers = {idx: moe for idx, _, moe in moe_layers(model)}

    def wrap_for(p: float):
        def wrap(forward):
            def forward_top_p(x: Tensor, *, context=None) -> Routing:
                return top_p_routing(forward(x, context=context), p)

            return forward_top_p

        return wrap

    with _wrapped([(r, wrap_for(p)) for l, p in spec.items() for r in layers[l].routers]):
        yield model


# ---------------------------------------------------------------------------------------------- C3PO


@dataclass
class References:
    """Successful reference queries for C3PO: their embeddings and last-token routing weights.

    embeddings: [N, D] mean final hidden state of each reference's tokens.
    weights: {layer: [N, E]} the last token's mixing weights over all E experts (0 where not chosen).
    """

    embeddings: Tensor
    weights: dict[int, Tensor]

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 2 or self.embeddings.shape[0] == 0:
            raise ValueError(f"References.embeddings: expected [N, D] with N >= 1, got {tuple(self.embeddings.shape)}")
        if not self.weights:
            raise ValueError("References.weights: expected at least one layer")
        for l, w in self.weights.items():
            if w.dim() != 2 or w.shape[0] != self.embeddings.shape[0]:
                raise ValueError(
                    f"References.weights[{l}]: expected [{self.embeddings.shape[0]}, E], got {tuple(w.shape)}"
                )


def _final_norm(model: nn.Module) -> nn.Module:
    for name in ("norm", "model.norm"):
        mod = model.get_submodule(name) if _has(model, name) else None
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError("C3PO: the model has no final norm (`norm` or `model.norm`) to take hidden states from")


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _dense(r: Routing) -> Tensor:
    """[T, E] mixing weights of the routing, 0 for unchosen experts."""
    ids, w = r.expert_ids, r.weights.float()
    out = torch.zeros(ids.shape[0], r.num_experts, dtype=torch.float32, device=ids.device)
    return out.scatter_add(1, ids.clamp_min(0), torch.where(ids >= 0, w, torch.zeros_like(w)))


@torch.no_grad()
def embed_and_route(model: nn.Module, ids: Tensor, layers: Sequence[int]) -> tuple[Tensor, dict[int, Tensor]]:
    """For one query ids [1, L]: (embedding [D] = mean final hidden state, {layer: last token's weights [E]})."""
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"C3PO: expected one query of token ids [1, L], got shape {tuple(ids.shape)}")
    moes = {idx: moe for idx, _, moe in moe_layers(model)}
    bad = sorted(set(layers) - set(moes))
    if bad:
        raise ValueError(f"C3PO: layers {bad} are not MoE layers; MoE layers are {sorted(moes)}")
    got: dict[str, Tensor] = {}
    routed: dict[int, Routing] = {}
    hooks = [_final_norm(model).register_forward_hook(lambda m, a, o: got.__setitem__("h", o))]
    for l in layers:
        hooks.append(moes[l].router.register_forward_hook(lambda m, a, o, l=l: routed.__setitem__(l, o)))
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    emb = got["h"].reshape(-1, got["h"].shape[-1]).float().mean(dim=0)
    return emb, {l: _dense(routed[l])[-1] for l in layers}


def build_references(model: nn.Module, queries: Sequence[Tensor], *, layers: Sequence[int]) -> References:
    """References from the token ids ([1, L] each) of queries the model answered well, at the critical `layers`."""
    if not queries:
        raise ValueError("build_references: expected at least one reference query")
    embs, ws = [], {int(l): [] for l in layers}
    for q in queries:
        e, w = embed_and_route(model, q, list(ws))
        embs.append(e)
        for l in ws:
            ws[l].append(w[l])
    return References(torch.stack(embs), {l: torch.stack(v) for l, v in ws.items()})


def c3po_weights(
    refs: References, query: Tensor, *, n_neighbors: int = 3, bandwidth: float | None = None
) -> dict[int, Tensor]:
    """{layer: [E]} kernel-regression average of the `n_neighbors` nearest references' weights to embedding
    query [D] (Gaussian kernel of bandwidth h; default: the median neighbour distance, 1 when that is 0)."""
    if n_neighbors < 1:
        raise ValueError(f"C3PO: n_neighbors must be >= 1, got {n_neighbors}")
    if bandwidth is not None and not bandwidth > 0:
        raise ValueError(f"C3PO: bandwidth must be > 0, got {bandwidth}")
    if query.shape != refs.embeddings.shape[1:]:
        raise ValueError(f"C3PO: query embedding must be [{refs.embeddings.shape[1]}], got {tuple(query.shape)}")
    d = (refs.embeddings.float() - query.float()).norm(dim=1)  # [N]
    n = min(n_neighbors, d.numel())
    dist, idx = d.topk(n, largest=False)
    h = float(bandwidth) if bandwidth is not None else (float(dist.median()) or 1.0)
    k = torch.exp(-(dist**2) / (2 * h * h))  # [n]
    k = k / k.sum() if float(k.sum()) > 0 else torch.full_like(k, 1.0 / n)
    return {l: (k[:, None] * w[idx].float()).sum(dim=0) for l, w in refs.weights.items()}


def remix_routing(routing: Routing, target: Tensor, rows: Tensor, mix: float = 1.0) -> Routing:
    """The routing with rows `rows` re-mixed toward dense weights target [E]: omega <- omega + mix * (target -
    omega), then the top k of omega, rescaled to each row's original weight sum."""
    k = routing.top_k
    ids, w = routing.expert_ids.clone(), routing.weights.clone()
    own = _dense(routing)[rows]  # [R, E]
    omega = own + mix * (target.to(own.device)[None] - own)
    new_w, new_ids = omega.topk(k, dim=1)
    total = routing.weights[rows].float().sum(dim=1, keepdim=True)
    new_w = new_w * (total / new_w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny))
    ids[rows] = torch.where(new_w > 0, new_ids, torch.full_like(new_ids, -1))
    w[rows] = torch.where(new_w > 0, new_w, torch.zeros_like(new_w)).to(w.dtype)
    return _rebuild(routing, ids, w)


@contextmanager
def remix(model: nn.Module, weights: dict[int, Tensor], *, mix: float = 1.0) -> Iterator[nn.Module]:
    """Within the block, the last token of every sequence in each forward is re-mixed toward `weights[l]`
    ([E]) at MoE layer l (`remix_routing`); in KV-cached generation that is the prompt's last token and each
    new token."""
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"C3PO: mix must be in [0, 1], got {mix}")
    layers = {idx: moe for idx, _, moe in moe_layers(model)}
    plan = []
    for l, target in weights.items():
        if l not in layers:
            raise ValueError(f"C3PO: layer {l} is not an MoE layer; MoE layers are {sorted(layers)}")
        E = layers[l].router.num_experts
        if target.shape != (E,):
            raise ValueError(f"C3PO: layer {l}: weights must be [{E}], got {tuple(target.shape)}")

        def wrap(forward, target=target):
            def forward_remixed(x: Tensor, *, context=None) -> Routing:
                r = forward(x, context=context)
                T = r.num_tokens
                L = context.seq_len if context is not None and context.seq_len else T
                rows = torch.arange(L - 1, T, L, device=r.expert_ids.device)
                return remix_routing(r, target, rows, mix)

            return forward_remixed

        plan += [(router, wrap) for router in layers[l].routers]
    with _wrapped(plan):
        yield model


@contextmanager
def c3po(
    model: nn.Module,
    refs: References,
    query_ids: Tensor,
    *,
    n_neighbors: int = 3,
    bandwidth: float | None = None,
    mix: float = 1.0,
) -> Iterator[dict[int, Tensor]]:
    """Re-mix the routing of query_ids [1, L] at the references' layers from its nearest references (see module
    docstring); yields the target weights {layer: [E]}."""
    emb, _ = embed_and_route(model, query_ids, list(refs.weights))
    target = c3po_weights(refs, emb, n_neighbors=n_neighbors, bandwidth=bandwidth)
    with remix(model, target, mix=mix):
        yield target


__all__ = [
    "References", "build_references", "c3po", "c3po_weights", "dynamic_k", "embed_and_route", "remix",
    "remix_routing", "top_p_routing",
]
