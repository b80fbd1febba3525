"""Calibration statistics, pruning choices and dynamic skipping, checked against hand computations."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.compress import calibrate, disable_skipping, enable_skipping, kept_count, prune, super_experts
from moekit.compress.naee import reconstruction_error, search_subset
from moekit.compress.skip import skip_slots
from moekit.layers.experts import Experts
from moekit.layers.moe import MoE
from moekit.models import MoELM
from moekit.routing.registry import build_router
from moekit.routing.routing import Routing
from moekit.train.checkpoint import load_model, save_checkpoint
from tests.helpers import tiny_lm


class Toy(nn.Module):
    """Token t -> one-hot row x_t [D], then one MoE layer (routing fully known from the router weight)."""

    def __init__(self, moe: MoE, D: int) -> None:
        super().__init__()
        self.register_buffer("table", torch.eye(D))
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = moe

    def forward(self, ids):
        return self.layers[0].mlp(self.table[ids])[0]


def toy(D=4, E=4):
    router = build_router("topk", dim=D, num_experts=E, k=2)
    with torch.no_grad():  # token t: logit 10 for expert t, 5 for expert t+1, 0 for the others
        W = torch.zeros(E, D)
        for t in range(D):
            W[t % E, t] = 10.0
            W[(t + 1) % E, t] = 5.0
        router.weight.copy_(W)
    torch.manual_seed(1)
    return Toy(MoE(router=router, experts=Experts(num_experts=E, dim=D, hidden=3)), D)


def expert_out(experts: Experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert e by hand: down (silu(gate x) * (up x))."""
    F_ = experts.hidden
    gu = experts.gate_up_proj[e]
    return experts.down_proj[e] @ (F.silu(gu[:F_] @ x) * (gu[F_:] @ x))


def test_frequency_and_reap_statistics_by_hand():
    m = toy()
    cal = calibrate(m, [torch.tensor([[0, 1, 0, 0]])])
    s = cal.layers[0]
    # token 0 (x3) -> experts 0 (top) and 1; token 1 (x1) -> experts 1 (top) and 2; expert 3 never
    assert s.counts.tolist() == [3, 4, 1, 0]
    assert s.never_routed == [3] and cal.never_routed == {0: [3]}
    w1, w2 = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))
    ex = m.layers[0].mlp.experts
    x0, x1 = torch.eye(4)[0], torch.eye(4)[1]
    with torch.no_grad():
        n = lambda e, x: float(expert_out(ex, e, x).norm())  # noqa: E731
        want = torch.tensor([3 * w1 * n(0, x0), 3 * w2 * n(1, x0) + w1 * n(1, x1), w2 * n(2, x1), 0.0])
    torch.testing.assert_close(s.saliency_sum, want)
    torch.testing.assert_close(s.saliency(), want / torch.tensor([3.0, 4.0, 1.0, 1.0]))
    assert torch.isfinite(s.saliency()).all() and s.peak[3] == 0
    assert s.skip_beta() == pytest.approx(math.exp(-5), rel=1e-4)
    assert s.inputs.shape == (4, 4) and s.tokens == 4

    pruned = copy.deepcopy(m)
    r = prune(pruned, "frequency", cal, ratio=0.5, protect_super_experts=False)
    assert r.kept == {0: [0, 1]} and pruned.layers[0].mlp.experts.num_experts == 2
    order = sorted(range(4), key=lambda e: (-float(want[e] / max(int(s.counts[e]), 1)), e))
    r = prune(copy.deepcopy(m), "reap", cal, ratio=0.5, protect_super_experts=False)
    assert r.kept == {0: sorted(order[:2])}


def test_super_experts_are_protected():
    m = toy()
    with torch.no_grad():
        m.layers[0].mlp.experts.down_proj[2] *= 1e4  # expert 2's outputs: extreme outliers
    cal = calibrate(m, [torch.tensor([[0, 1, 0, 0]])])
    assert super_experts(cal) == {0: [2]}
    assert prune(copy.deepcopy(m), "frequency", cal, ratio=0.5).kept == {0: [1, 2]}
    assert prune(copy.deepcopy(m), "frequency", cal, ratio=0.5, protect_super_experts=False).kept == {0: [0, 1]}


def test_ratio_and_k_errors_change_nothing():
    m = toy()
    cal = calibrate(m, [torch.tensor([[0, 1, 2, 3]])])
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="ratio"):
            prune(m, "frequency", cal, ratio=bad)
    with pytest.raises(ValueError, match="k=2"):  # keeps 1 expert, the router picks 2
        prune(m, "frequency", cal, ratio=0.75)
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        prune(m, "nope", cal, ratio=0.25)
    assert m.layers[0].mlp.experts.num_experts == 4
    assert kept_count(8, 0.25) == 6 and kept_count(4, 0.25) == 3
    with pytest.raises(ValueError, match="removes 0"):
        kept_count(2, 0.2)
    with pytest.raises(ValueError, match="no MoE layers"):
        calibrate(MoELM(tiny_lm()), [torch.zeros(1, 4, dtype=torch.long)])


def _by_hand(layer: MoE, x: torch.Tensor, S: tuple[int, ...]) -> torch.Tensor:
    """The layer's output when only experts S exist: top-2 of their logits, renormalised softmax weights."""
    logits = x @ layer.router.weight.T  # [N, E]
    sub = logits[:, list(S)]
    top, pos = sub.topk(2, dim=-1)
    w = torch.softmax(top, dim=-1)
    ids = torch.tensor(S)[pos]
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for j in range(2):
            out[t] += w[t, j] * expert_out(layer.experts, int(ids[t, j]), x[t])
    return out


@torch.no_grad()
def test_naee_exhaustive_equals_brute_force():
    torch.manual_seed(0)
    m = MoELM(tiny_lm(num_experts=6, expert_hidden=8, router_args={"k": 2}))
    cal = calibrate(m, [torch.randint(0, 64, (2, 8))], max_rows=12)
    layer, x = m.layers[0].mlp, cal.layers[0].inputs
    full = _by_hand(layer, x, tuple(range(6)))
    torch.testing.assert_close(full, layer(x)[0], atol=1e-5, rtol=1e-4)
    errs = {S: float((_by_hand(layer, x, S) - full).pow(2).sum(-1).mean()) for S in itertools.combinations(range(6), 4)}
    best = min(errs, key=lambda S: (errs[S], S))
    S = (0, 2, 3, 5)
    assert reconstruction_error(layer, x, S) == pytest.approx(errs[S], rel=1e-4, abs=1e-9)
    r = prune(copy.deepcopy(m), "naee", cal, ratio=1 / 3, protect_super_experts=False)
    assert tuple(r.kept[0]) == best


def test_greedy_equals_exhaustive_on_additive_cost():
    cost = [5.0, 0.5, 3.0, 0.1, 2.0, 4.0, 0.2, 1.0]  # error = cost of the removed experts: greedy is exact
    err = lambda S: sum(c for e, c in enumerate(cost) if e not in S)  # noqa: E731
    exhaustive = search_subset(8, 5, [], err)
    assert exhaustive == (0, 2, 4, 5, 7)
    assert search_subset(8, 5, [], err, max_subsets=1) == exhaustive
    assert search_subset(8, 5, [3], err, max_subsets=1) == search_subset(8, 5, [3], err) == (0, 2, 3, 4, 5)


@torch.no_grad()
def test_pruned_model_equals_model_built_with_kept_experts_and_round_trips(tmp_path):
    torch.manual_seed(0)
    m = MoELM(tiny_lm(num_experts=4, expert_hidden=8, router_args={"k": 2}))
    cal = calibrate(m, [torch.randint(0, 64, (2, 8))])
    pruned = copy.deepcopy(m)
    r = prune(pruned, "reap", cal, ratio=0.25, protect_super_experts=False)
    assert pruned.config.num_experts == 3
    built = MoELM(tiny_lm(num_experts=3, expert_hidden=8, router_args={"k": 2}))
    state = m.state_dict()
    for key in list(state):
        block = key.split(".")[1] if key.startswith("layers.") else None
        if block is not None and any(key.endswith(s) for s in ("experts.gate_up_proj", "experts.down_proj",
                                                                "router.weight")):
            state[key] = state[key][r.kept[int(block)]]
    built.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(pruned(ids).logits, built(ids).logits)
    save_checkpoint(tmp_path / "run", pruned, {"step": 0})
    back = load_model(tmp_path / "run")
    assert back.config.num_experts == 3
    torch.testing.assert_close(back(ids).logits, pruned(ids).logits)


def test_dynamic_skipping():
    r = Routing(torch.tensor([[1, 0], [2, 3], [0, -1]]), torch.tensor([[0.7, 0.3], [0.55, 0.45], [1.0, 0.0]]),
                torch.zeros(3, 4), 4)
    out = skip_slots(r, 0.5)
    assert out.expert_ids.tolist() == [[1, -1], [2, 3], [0, -1]]
    torch.testing.assert_close(out.weights, torch.tensor([[0.7, 0.0], [0.55, 0.45], [1.0, 0.0]]))
    m = toy()
    cal = calibrate(m, [torch.tensor([[0, 1, 2, 3]])])
    ids = torch.tensor([[0, 1, 2]])
    with torch.no_grad():
        before = m(ids)
        betas = enable_skipping(m, cal)
        assert betas == {0: pytest.approx(math.exp(-5), rel=1e-4)}
        torch.testing.assert_close(m(ids), before)  # the second weight is exactly at the median: kept
        disable_skipping(m)
        enable_skipping(m, beta=1.0)  # every second expert dropped: top-1 term only
        ex, w1 = m.layers[0].mlp.experts, 1 / (1 + math.exp(-5))
        want = torch.stack([w1 * expert_out(ex, t, torch.eye(4)[t]) for t in range(3)])
        torch.testing.assert_close(m(ids)[0], want)
        disable_skipping(m)
        torch.testing.assert_close(m(ids), before)
