"""SparseMixer (GRIN / PhiMoE) routing against a per-token reference, hand-computed numbers, its
training estimator's gradient and bad arguments. Parity with transformers' PhiMoE: tests/hf."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.routing import build_router


def sparsemixer_reference(logits: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode SparseMixer one token at a time in Python floats: logits [T, E] -> (ids, weights) [T, k]."""
    all_ids, all_w = [], []
    for row in logits.tolist():
        taken: list[int] = []
        ids, ws = [], []
        for _ in range(k):
            rest = [(s if e not in taken else -math.inf) for e, s in enumerate(row)]
            m = max(rest)
            best = rest.index(m)
            # a score takes part when (m - s) / max(|s|, m) <= 2 eps (removed ones stay -inf)
            kept = [s for s in rest if s != -math.inf and (m - s) / max(abs(s), m) <= 2 * eps]
            z = sum(math.exp(s - m) for s in kept)
            ids.append(best)
            ws.append(1.0 / z)  # exp(m - m) / z
            taken.append(best)
        all_ids.append(ids)
        all_w.append(ws)
    return torch.tensor(all_ids), torch.tensor(all_w)


def _router(E: int = 6, k: int = 2, eps: float = 0.2, D: int = 8):
    torch.manual_seed(0)
    r = build_router("sparsemixer", dim=D, num_experts=E, k=k, jitter_eps=eps).eval()
    with torch.no_grad():
        r.weight.normal_(std=1.0)
    return r


@pytest.mark.parametrize("k,eps", [(1, 0.2), (2, 0.01), (2, 0.3), (3, 0.5)])
def test_eval_matches_the_per_token_reference(k, eps):
    r = _router(k=k, eps=eps)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    out = r(x)
    ids, w = sparsemixer_reference(out.logits.double(), k, eps)
    assert torch.equal(out.expert_ids, ids)
    torch.testing.assert_close(out.weights.double(), w.double(), atol=1e-6, rtol=1e-6)
    assert out.expert_ids.shape == (40, k) and (out.expert_ids.sort(-1).values.diff(dim=-1) > 0).all()


def test_hand_computed_weights():
    """Logits (2.0, 1.9, 1.0, -1.0), eps = 0.05: slot 1 keeps 2.0 and 1.9 ((2 - 1.9) / 2 = 0.05 <= 0.1,
    (2 - 1) / 2 = 0.5 > 0.1): weight 1 / (1 + e^-0.1); slot 2 over (1.9, 1.0): (1.9 - 1) / 1.9 > 0.1, so
    only 1.9 is kept: weight 1."""
    r = build_router("sparsemixer", dim=4, num_experts=4, k=2, jitter_eps=0.05).eval()
    with torch.no_grad():
        r.weight.copy_(torch.diag(torch.tensor([2.0, 1.9, 1.0, -1.0])))
    out = r(torch.ones(1, 4))
    assert out.expert_ids.tolist() == [[0, 1]]
    torch.testing.assert_close(out.weights, torch.tensor([[1 / (1 + math.exp(-0.1)), 1.0]]))


def test_training_samples_and_gradient_is_grins_estimator():
    """In training the choice is sampled (not always the argmax), and the weights' gradient reaches the
    logits as weight * (onehot(expert) - gates), never through the softmax's own graph."""
    r = _router(k=1, eps=10.0).train()  # a huge threshold: every expert competes
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    out = r(x)
    assert (out.expert_ids[:, 0] != out.logits.argmax(-1)).any()
    logits = out.logits.detach().requires_grad_(True)
    from moekit.routing.sparsemixer import sparsemixer_step

    torch.manual_seed(4)
    w, e = sparsemixer_step(logits, logits, 10.0, True, first=True)
    w.sum().backward()
    gates = torch.softmax(logits.detach(), -1)
    weight = gates.gather(-1, e)
    want = weight * (torch.nn.functional.one_hot(e[:, 0], 6) - gates)
    torch.testing.assert_close(logits.grad, want)
    scale = w.detach() / weight  # 1 where the sample is the argmax (or with prob. 1/4), else 1/3
    assert set(torch.round(scale * 3).unique().tolist()) <= {1.0, 3.0}


@pytest.mark.parametrize("bad", [dict(jitter_eps=0.0), dict(jitter_eps=-1.0), dict(k=0), dict(k=7),
                                 dict(load_balance=-1.0)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_router("sparsemixer", dim=8, num_experts=6, **bad)
