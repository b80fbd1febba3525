"""One contract test over every registered router (DESIGN.md contract 1 and 2)."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.layers import Experts, MoE
from moekit.routing import (
    Routing,
    RoutingContext,
    build_router,
    get_router,
    list_routers,
    router_config,
    router_from_config,
)

D, E, T, L = 16, 8, 24, 12  # width, experts, tokens (2 sequences of 12)


def make(name: str) -> torch.nn.Module:
    return build_router(name, dim=D, num_experts=E)


def context_for(T: int) -> RoutingContext:
    return RoutingContext(seq_len=L, token_ids=torch.arange(T) * 7 % 50)


@pytest.fixture(params=list_routers())
def name(request) -> str:
    return request.param


def test_registry_lists_core_routers():
    assert {"topk"} <= set(list_routers())
    with pytest.raises(KeyError, match="known routers: .*topk"):
        get_router("no-such-router")


def test_shapes_ranges_and_empty_slots(name):
    router = make(name).train()
    x = torch.randn(T, D)
    r = router(x, context=context_for(T))
    assert isinstance(r, Routing)
    k = r.expert_ids.shape[1]
    assert r.expert_ids.shape == (T, k) and r.weights.shape == (T, k) and k >= 1
    assert r.expert_ids.dtype == torch.long
    assert r.logits.shape[0] == T and r.logits.shape[1] >= E
    assert r.num_experts == E
    assert int(r.expert_ids.min()) >= -1 and int(r.expert_ids.max()) < E
    empty = r.expert_ids < 0
    assert torch.all(r.weights[empty] == 0), "empty slots must carry zero weight"
    assert torch.isfinite(r.weights).all()
    assert torch.all(r.weights >= 0)
    for key, v in r.aux.items():
        assert v.dim() == 0 and torch.isfinite(v), key
    # a token never lists the same real expert twice
    for row in r.expert_ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))


def test_gradients_reach_router_parameters(name):
    router = make(name).train()
    params = [p for p in router.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"{name} has no trainable parameters")
    moe = MoE(router=router, experts=Experts(num_experts=E, dim=D, hidden=32))
    x = torch.randn(2, L, D)
    y, r = moe(x, token_ids=(torch.arange(2 * L) * 7 % 50).reshape(2, L))
    (y.square().mean() + r.total_aux()).backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0, "router parameters got zero gradient"


def test_eval_mode_is_deterministic(name):
    router = make(name).eval()
    x = torch.randn(T, D)
    a, b = router(x, context=context_for(T)), router(x, context=context_for(T))
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.equal(a.weights, b.weights)


def test_config_round_trips_through_json(name):
    router = make(name).eval()
    cfg = json.loads(json.dumps(router_config(router)))
    assert cfg["name"] == name and cfg["args"]["dim"] == D and cfg["args"]["num_experts"] == E
    clone = router_from_config(cfg).eval()
    assert router_config(clone) == cfg
    clone.load_state_dict(router.state_dict())
    x = torch.randn(T, D)
    a, b = router(x, context=context_for(T)), clone(x, context=context_for(T))
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights)


def test_wrong_rank_or_width_is_a_clear_error(name):
    router = make(name)
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        router(torch.randn(2, T, D), context=context_for(2 * T))
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        router(torch.randn(T, D + 1), context=context_for(T))


def test_unknown_argument_lists_accepted_ones(name):
    with pytest.raises(TypeError, match="accepts"):
        build_router(name, dim=D, num_experts=E, no_such_arg=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_a_clear_error(name, bad):
    """Every router refuses NaN/inf tokens instead of routing them silently (hash/random included)."""
    for mode in ("train", "eval"):
        router = getattr(make(name), mode)()
        x = torch.randn(T, D)
        x[3, 5] = bad
        with pytest.raises(FloatingPointError, match="non-finite"):
            router(x, context=context_for(T))


def test_every_loss_coefficient_is_validated_by_the_base_class(name):
    router = make(name)
    for loss in router.loss_names:
        assert getattr(router, loss) == router_config(router)["args"][loss]
        for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
            with pytest.raises(ValueError, match=f"{loss} must be a finite number >= 0, got"):
                build_router(name, dim=D, num_experts=E, **{loss: bad})


def test_routers_with_losses_declare_them():
    assert set(make("topk").loss_names) == {"load_balance", "seq_balance", "z_loss"}
    assert set(make("topp").loss_names) == {"dynamic_loss", "load_balance", "seq_balance", "z_loss"}
    assert make("hash").loss_names == ()
    with pytest.raises(ValueError, match="load_balance must be a finite number >= 0, got -1.0"):
        build_router("topk", dim=D, num_experts=E, load_balance=-1.0)


def test_routers_declare_what_they_need(name):
    """`needs_token_ids`, `needs_full_sequence` and `needs_previous` say what a router reads from its context."""
    router = make(name).eval()
    x = torch.randn(T, D)
    ids = torch.arange(T) * 7 % 50
    if router.needs_token_ids:
        with pytest.raises(ValueError, match="token id"):
            router(x, context=RoutingContext(seq_len=L))
    else:
        router(x, context=RoutingContext(seq_len=L))  # works without ids
    one = router(x, context=RoutingContext(seq_len=T, token_ids=ids))  # the rows as one sequence
    two = router(x, context=RoutingContext(seq_len=L, token_ids=ids))  # ... as two
    same = torch.equal(one.expert_ids, two.expert_ids) and torch.equal(one.weights, two.weights)
    assert same != router.needs_full_sequence, "only routers that read whole sequences depend on seq_len"
    if not router.needs_previous:
        h = torch.randn(T, 8)
        prev = Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), torch.zeros(T, E), E, state=h)
        other = router(x, context=RoutingContext(seq_len=L, token_ids=ids, previous=prev))
        assert torch.equal(other.expert_ids, two.expert_ids)


# --- expert-set surgery (DESIGN.md contract 6; moekit.layers.surgery, docs/surgery.md) -----------

KEEP = [1, 2, 4, 5, 6, 7]  # experts 0 and 3 removed
# Routers whose pruned routing equals the old routing with the removed experts' scores at -inf.
MASKED = {"topk", "switch", "moec", "recurrent", "autonomy", "smoe_dropout", "prototype", "uncertainty", "nexus",
          "null_experts", "topp", "smear", "deepseek", "sparsemixer"}
# The others, and why "equal to masking" does not hold for them:
NOT_MASKED = {
    "expert_choice": "each expert's capacity ceil(cf T k / E) depends on E, and removed experts took tokens",
    "graph_of_tokens": "the token graph uses every expert's score as a token feature",
    "attention": "the experts' scores attend to each other: a removed expert changed the others' scores",
    "mixture_of_routers": "each sub-router renormalises over the kept experts (masking at the sub-router logits, "
                          "which the returned logits, a log of the mixture, do not show)",
    "random": "a random draw over the new experts", "stochastic": "a random draw over the new experts",
}
REFUSED = {"hash"}  # experts come from a hash of (token id, expert id): no surgery
SURGERY_ARGS = {"switch": {"capacity_factor": None}}  # capacity depends on E (see NOT_MASKED's expert_choice)


def test_every_router_declares_its_per_expert_tensors(name):
    cls = get_router(name)
    assert "expert_dims" in vars(cls), f"{cls.__name__} must declare expert_dims (None: no surgery)"
    assert name in MASKED | set(NOT_MASKED) | REFUSED


def _dense(ids: torch.Tensor, weights: torch.Tensor, E: int) -> torch.Tensor:
    """[T, E] mixing weight of every expert (slots with ids outside [0, E) dropped)."""
    ok = (ids >= 0) & (ids < E)
    out = torch.zeros(ids.shape[0], E + 1, dtype=torch.float32)
    return out.scatter_add(1, torch.where(ok, ids, E), torch.where(ok, weights.float(), 0.0))[:, :E]


def _masked_reference(name: str, old: torch.nn.Module, r: Routing, removed: torch.Tensor) -> torch.Tensor:
    """[T, E] mixing weights of the OLD router with the removed experts' scores at -inf, computed from
    what it returned (logits, meta) and its arguments."""
    inf = float("-inf")
    if name == "deepseek":
        s = r.meta["scores"]
        choice = (s + old.e_score_correction_bias.float()).masked_fill(removed, inf)
        ids = choice.topk(old.k, dim=-1).indices
        w = s.gather(1, ids)
        return _dense(ids, w / w.sum(-1, keepdim=True) * old.routed_scaling_factor, E)
    scores = r.logits.float()
    if name == "sparsemixer":  # removed experts at -inf never pass the threshold nor take a slot
        from tests.routing.test_sparsemixer import sparsemixer_reference

        ids, w = sparsemixer_reference(scores.double().masked_fill(removed, inf), old.k, old.jitter_eps)
        return _dense(ids, w.float(), E)
    if name == "uncertainty":  # weights from the variance-tempered scores
        scores = scores / torch.sqrt(1.0 + torch.pi * r.meta["variance"] / 8.0)
    if name == "null_experts":
        removed = torch.cat([removed, torch.zeros(old.num_null, dtype=torch.bool)])
    probs = torch.softmax(scores.masked_fill(removed, inf), dim=-1)
    if name == "smear":
        return probs
    if name == "topp":
        top, ids = probs.sort(dim=-1, descending=True)
        used = (top.cumsum(-1) - top) < old.p
        return _dense(torch.where(used, ids, -1), top, E)
    w, ids = probs.topk(old.nominal_k, dim=-1)
    if getattr(old, "normalize", name == "autonomy"):
        w = w / w.sum(-1, keepdim=True)
    return _dense(ids, w, E)


def test_keep_experts_equals_masking_the_removed_experts(name):
    """After keep_experts the layer routes and computes as the old layer with the removed experts'
    scores at -inf (MASKED); for the others the new routing is valid over the kept experts and, where
    logits are the gate's scores, they are the old logits of the kept experts."""
    import copy

    from moekit.layers import keep_experts
    from moekit.layers.smear import dense_weights

    router = build_router(name, dim=D, num_experts=E, **SURGERY_ARGS.get(name, {})).eval()
    if name == "deepseek":
        router.e_score_correction_bias.uniform_(-0.3, 0.3)
    experts = Experts(num_experts=E, dim=D, hidden=32)
    moe = MoE(router=router, experts=experts).eval()
    if name in REFUSED:
        with pytest.raises(ValueError, match=f"{type(router).__name__}.*cannot change its expert set"):
            keep_experts(moe, KEEP)
        assert router.num_experts == E and experts.num_experts == E
        return
    old = copy.deepcopy(moe)
    x = torch.randn(T, D)
    with torch.no_grad():
        y_old, r_old = old(x, context=context_for(T))
        keep_experts(moe, KEEP)
        y, r = moe(x, context=context_for(T))
    assert router.num_experts == len(KEEP) == experts.num_experts == r.num_experts
    assert int(r.expert_ids.max()) < len(KEEP)
    clone = router_from_config(router_config(router))  # the config describes the pruned router
    clone.load_state_dict(router.state_dict())
    if name not in ("attention", "mixture_of_routers", "random", "stochastic"):
        n_extra = r_old.logits.shape[1] - E  # null experts' columns stay
        torch.testing.assert_close(r.logits, torch.cat([r_old.logits[:, KEEP], r_old.logits[:, E:E + n_extra]], 1))
    if name not in MASKED:
        return
    removed = torch.ones(E, dtype=torch.bool)
    removed[KEEP] = False
    want = _masked_reference(name, old.router, r_old, removed)  # [T, E]
    assert torch.all(want[:, removed] == 0)
    torch.testing.assert_close(dense_weights(r).float(), want[:, KEEP], atol=1e-6, rtol=1e-5)
    ids = torch.arange(E).expand(T, E)  # the old experts under the masked routing
    with torch.no_grad():
        y_want = old.experts(x, Routing(ids.contiguous(), want.to(x.dtype), want, E))
    torch.testing.assert_close(y, y_want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(y, y_old, atol=1e-4), "removing experts should change some outputs"
