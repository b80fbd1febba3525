"""Local routing consistency: SRP and SCH (Liang et al. 2025, "Not All Models Suit Expert
Offloading: On Local Routing Consistency of Mixture-of-Expert Models").

For one layer, a *segment* is L consecutive tokens of one sequence (sliding, stride 1; segments never
cross sequences). c_e(s) = activations of expert e in segment s (a token activates its k experts).

SRP(L) -- Segment Routing best Performance: a segment is served by the fixed expert set
S_tau(s) = {e : c_e(s) >= tau * L}. Summed over all segments, M = activations that fall in the set,
P = |S_tau(s)| * L predicted activations, A = all activations; SRP(L) = max_tau 2M / (P + A) (an F1
score; tau shared by all segments). SRP = 1 when every segment uses one fixed set of k experts.

SCH(L, m) -- Segment Cache best Hit rate: each segment may hold C = m * k experts in a cache chosen
with knowledge of the segment (the best fixed cache: its C most used experts); SCH = cache hits /
activations over all segments. k is the trace's measured experts per token, rounded (`Trace.k`), so a
router with a variable number of experts per token is measured at what its tokens use. A cache of
C >= E experts holds every expert and hits always: SCH is then None (not applicable), not 1.
"""

from __future__ import annotations

import numpy as np

from moekit.analyze.table import Trace


def prefix_counts(experts: np.ndarray, E: int) -> np.ndarray:
    """csum [N+1, E]: activations of each expert among the first n tokens. experts: [N, k]."""
    N = experts.shape[0]
    onehot = np.zeros((N + 1, E), dtype=np.int32)
    for s in range(experts.shape[1]):
        e = experts[:, s]
        ok = e >= 0
        onehot[1:][np.nonzero(ok)[0], e[ok]] += 1
    return np.cumsum(onehot, axis=0, out=onehot)


def segment_counts(experts: np.ndarray, seq: np.ndarray, L: int, E: int, csum: np.ndarray | None = None) -> np.ndarray:
    """c [W, E]: activations per expert in every length-L segment inside one sequence. experts: [N, k]."""
    N = experts.shape[0]
    if N < L:
        return np.zeros((0, E), dtype=np.int32)
    if csum is None:
        csum = prefix_counts(experts, E)
    starts = np.arange(N - L + 1)
    valid = seq[starts] == seq[starts + L - 1]  # rows are (seq, pos)-ordered: same seq at both ends
    starts = starts[valid]
    return csum[starts + L] - csum[starts]


def srp_from_counts(c: np.ndarray, L: int) -> tuple[float, float]:
    """(SRP, best tau) from segment counts c [W, E]."""
    if c.size == 0:
        return float("nan"), float("nan")
    hist = np.bincount(c.reshape(-1), minlength=L + 1).astype(np.float64)  # (segment, expert) pairs per count
    values = np.arange(len(hist), dtype=np.float64)
    A = (values * hist).sum()
    if A == 0:
        return float("nan"), float("nan")
    # threshold at count t (tau = t / L), t = 1..max: M(t) = sum_{c >= t} c hist[c], P(t) = L sum_{c >= t} hist[c]
    M = np.cumsum((values * hist)[::-1])[::-1]
    Pn = np.cumsum(hist[::-1])[::-1]
    t = np.arange(1, len(hist))
    f1 = 2 * M[t] / (L * Pn[t] + A)
    best = int(np.argmax(f1))
    return float(f1[best]), float(t[best] / L)


def sch_from_counts(c: np.ndarray, capacity: int) -> float | None:
    """SCH from segment counts c [W, E] and a cache of `capacity` experts (None when capacity >= E)."""
    if capacity >= c.shape[1]:
        return None
    if c.size == 0:
        return float("nan")
    total = c.sum()
    if total == 0:
        return float("nan")
    E = c.shape[1]
    top = np.partition(c, E - capacity, axis=1)[:, E - capacity :]
    return float(top.sum() / total)


def local_consistency(trace: Trace, segment_lengths=(4, 8, 16, 32, 64), cache_multiples=(1, 2, 4)) -> dict[int, dict]:
    """Per layer: SRP(L) for each L, and SCH(L, m) for each L and cache size m * k."""
    E, k = trace.num_experts, trace.k
    out = {}
    for layer in trace.layers:
        r = trace.layer(layer)
        csum = prefix_counts(r.experts, E)
        res = {"srp": {}, "srp_tau": {}, "sch": {}}
        for L in segment_lengths:
            c = segment_counts(r.experts, r.seq, L, E, csum)
            srp, tau = srp_from_counts(c, L)
            res["srp"][L], res["srp_tau"][L] = srp, tau
            res["sch"][L] = {m: sch_from_counts(c, m * k) for m in cache_multiples}
        out[layer] = res
    return out
