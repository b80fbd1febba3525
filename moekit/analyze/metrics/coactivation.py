"""Co-activation within a layer and inter-layer affinity.

Inter-layer affinity follows ExFlow (Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for
Accelerating Mixture-of-Experts Model Inference"): the conditional probability
P(expert j at layer l+1 | expert i at layer l) over the tokens of a trace.
"""

from __future__ import annotations

import numpy as np

from moekit.analyze.table import Trace


def pair_counts(a: np.ndarray, b: np.ndarray, E: int) -> np.ndarray:
    """C[i, j] = number of (token, slot_a, slot_b) with a[t, slot_a] = i and b[t, slot_b] = j. a, b: [N, k]."""
    C = np.zeros((E, E), dtype=np.int64)
    for sa in range(a.shape[1]):
        for sb in range(b.shape[1]):
            x, y = a[:, sa].astype(np.int64), b[:, sb].astype(np.int64)
            ok = (x >= 0) & (y >= 0)
            C += np.bincount(x[ok] * E + y[ok], minlength=E * E).reshape(E, E)
    return C


def coactivation(trace: Trace) -> dict[int, dict]:
    """Per layer: C[i, j] = tokens that use both i and j (i != j), and P(j | i) = C[i, j] / load_i."""
    out = {}
    E = trace.num_experts
    for layer in trace.layers:
        r = trace.layer(layer)
        C = pair_counts(r.experts, r.experts, E)
        np.fill_diagonal(C, 0)
        load = np.bincount(r.experts[r.experts >= 0], minlength=E)
        out[layer] = {"counts": C.tolist(), "conditional": (C / np.maximum(load[:, None], 1)).tolist()}
    return out


def interlayer_affinity(trace: Trace) -> dict[str, dict]:
    """For consecutive traced layers (l, l'): P(j at l' | i at l) [E, E], and the affinity score

        A(l) = sum_i p_l(i) * (sum of the k largest P(. | i))

    the expected share of a token's next-layer choices that fall in the k most likely successors
    of its current choice (k/E for routing independent across layers, 1.0 when the successor set is
    determined). Also `lift` = A / (k/E). Over the tokens both layers routed (a mixture-of-depths layer
    routes only the tokens it processed; `tokens` says how many were paired).

    k is the trace's measured experts per token, rounded (`Trace.k`): for a router whose number of experts
    varies by token it is what tokens actually use, not the slot count. When k >= E the k most likely
    successors are every expert and the score is 1 whatever the routing: `score` and `lift` are then None
    (not applicable)."""
    out = {}
    E, k = trace.num_experts, trace.k
    layers = trace.layers
    for l0, l1 in zip(layers, layers[1:], strict=False):
        a, b = trace.layer(l0), trace.layer(l1)
        ea, eb = a.experts, b.experts
        if ea.shape != eb.shape or not (np.array_equal(a.seq, b.seq) and np.array_equal(a.pos, b.pos)):
            span = int(max(a.pos.max(initial=0), b.pos.max(initial=0))) + 1
            _, ia, ib = np.intersect1d(a.seq.astype(np.int64) * span + a.pos, b.seq.astype(np.int64) * span + b.pos,
                                       assume_unique=True, return_indices=True)
            ea, eb = ea[ia], eb[ib]
        C = pair_counts(ea, eb, E).astype(np.float64)
        rows = C.sum(axis=1, keepdims=True)
        P = C / np.maximum(rows, 1)
        p_src = rows[:, 0] / max(rows.sum(), 1)
        score = lift = None
        if k < E:
            topk = np.sort(P, axis=1)[:, ::-1][:, :k].sum(axis=1)
            score = float((p_src * topk).sum())
            lift = score / (k / E)
        out[f"{l0}->{l1}"] = {"conditional": P.tolist(), "score": score, "lift": lift, "tokens": len(ea)}
    return out
