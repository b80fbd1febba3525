"""Per-request expert steering: switch experts off, or force them on, per MoE layer, on any model built
from moekit's `MoE` layer (moekit LMs and patched Hugging Face models), for the duration of a `with`.

Deactivation follows "Mixture of Tunable Experts" (Dahlke et al. 2025), which steers DeepSeek-R1 by
switching experts off at inference: a disabled expert's router logit becomes -inf before the router
picks its top k, so each token is routed among the remaining experts by the router's own rule (the
routing stays valid while at least k experts remain). Forcing expert e makes every token use it: a
token whose routing lacks e gets e in place of its lowest-weight slot, with that slot's weight (the
other slots keep theirs).

    with steer(model, disable={3: [5, 7]}, force={1: [2]}):
        out = model.generate(prompt, 20)

The router's scores are masked by wrapping its `gate_logits` (the linear gate of `moekit.routing.base
.Router`); a router that routes without it (hash, random) cannot be steered by logits, which the
wrapper detects (a disabled expert chosen anyway) and reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from moekit.analyze.trace import moe_layers
from moekit.routing.routing import Routing


def parse_layer_experts(spec: str | None, option: str = "--disable-experts") -> dict[int, list[int]]:
    """"0:3,0:5,1:2" -> {0: [3, 5], 1: [2]} (layer:expert pairs, comma separated); "" or None -> {}."""
    out: dict[int, list[int]] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        bits = part.split(":")
        if len(bits) != 2 or not all(b.strip().isdigit() for b in bits):
            raise ValueError(f"{option}: expected LAYER:EXPERT pairs like '0:3,1:5', got {part!r}")
        out.setdefault(int(bits[0]), []).append(int(bits[1]))
    return out


def force_experts(routing: Routing, forced: list[int]) -> Routing:
    """The routing with each expert of `forced` in every token's slots: where a token lacks one, it replaces
    the token's lowest-weight slot not holding a forced expert (empty slots first), keeping that weight."""
    ids, w = routing.expert_ids.clone(), routing.weights.clone()
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for e in forced:
        has = ids == e
        keep |= has
        need = ~has.any(dim=1)  # [T]
        if not bool(need.any()):
            continue
        score = torch.where(ids < 0, torch.full_like(w, -float("inf")), w.float() if w.is_floating_point() else w)
        score = score.masked_fill(keep, float("inf"))  # never replace a forced slot
        slot = score.argmin(dim=1)  # [T]
        rows = need.nonzero(as_tuple=True)[0]
        ids[rows, slot[rows]] = e
        keep[rows, slot[rows]] = True
    return Routing(ids, w, routing.logits, routing.num_experts, aux=routing.aux, dropped=routing.dropped,
                   meta=routing.meta, state=routing.state)


def _install(router: nn.Module, disabled: Tensor | None, forced: list[int]) -> None:
    """Shadow the router's `gate_logits` and `forward` with steered versions (instance attributes)."""
    gate_logits, forward = router.gate_logits, router.forward
    who = type(router).__name__

    def masked_logits(x: Tensor) -> Tensor:
        logits = gate_logits(x)
        return logits.masked_fill(disabled.to(logits.device), -float("inf")) if disabled is not None else logits

    def steered_forward(x: Tensor, *, context=None) -> Routing:
        r = forward(x, context=context)
        if disabled is not None:
            ids = r.expert_ids
            chosen = disabled.to(ids.device)[ids.clamp_min(0)] & (ids >= 0)
            if bool(chosen.any()):
                raise RuntimeError(f"steer: router {who} does not route by gate_logits; its experts cannot be disabled")
        return force_experts(r, forced) if forced else r

    router.gate_logits = masked_logits
    router.forward = steered_forward


def _remove(router: nn.Module) -> None:
    for name in ("gate_logits", "forward"):
        router.__dict__.pop(name, None)


@contextmanager
def steer(
    model: nn.Module,
    *,
    disable: dict[int, Iterable[int]] | None = None,
    force: dict[int, Iterable[int]] | None = None,
) -> Iterator[nn.Module]:
    """Within the block, MoE layer l (its block index, as in traces) never routes to the experts
    `disable[l]` and routes every token to the experts `force[l]`. Bad layers or experts, fewer than k
    experts left, or more forced experts than k raise ValueError before anything changes."""
    disable = {int(k): sorted(set(map(int, v))) for k, v in (disable or {}).items()}
    force = {int(k): list(dict.fromkeys(map(int, v))) for k, v in (force or {}).items()}
    layers = {idx: moe for idx, _, moe in moe_layers(model)}
    plan: list[tuple[nn.Module, Tensor | None, list[int]]] = []
    for l in sorted(set(disable) | set(force)):
        if l not in layers:
            raise ValueError(f"steer: layer {l} is not an MoE layer; MoE layers are {sorted(layers)}")
        moe = layers[l]
        E = moe.router.num_experts
        off, on = disable.get(l, []), force.get(l, [])
        bad = [e for e in off + on if not 0 <= e < E]
        if bad:
            raise ValueError(f"steer: layer {l} has experts 0..{E - 1}, got {bad}")
        if set(off) & set(on):
            raise ValueError(f"steer: layer {l}: experts {sorted(set(off) & set(on))} are both disabled and forced")
        for router in moe.routers:
            k = router.nominal_k
            if E - len(off) < k:
                raise ValueError(f"steer: layer {l} routes to k={k} experts; disabling {len(off)} of {E} leaves fewer")
            if len(on) > k:
                raise ValueError(f"steer: layer {l} routes to k={k} experts; cannot force {len(on)}")
            mask = None
            if off:
                mask = torch.zeros(E, dtype=torch.bool)
                mask[off] = True
            plan.append((router, mask, on))
    try:
        for router, mask, on in plan:
            _install(router, mask, on)
        yield model
    finally:
        for router, _, _ in plan:
            _remove(router)


__all__ = ["force_experts", "parse_layer_experts", "steer"]
