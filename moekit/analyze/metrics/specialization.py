"""Specialisation: how expert choice depends on a label (domain, language) and on the token.

Mutual information between the expert chosen for a token-slot and the token's label (as in the
specialisation analyses of Jiang et al. 2024 "Mixtral of Experts" and Muennighoff et al. 2024
"OLMoE"), per layer: I(E; Y) = sum_{e,y} p(e, y) log(p(e, y) / (p(e) p(y))) in nats, and normalised
by H(Y) (0 = routing ignores the label, 1 = the expert determines the label).
"""

from __future__ import annotations

import math

import numpy as np

from moekit.analyze.table import Trace


def mutual_information(joint: np.ndarray, *, base: float = math.e) -> tuple[float, float]:
    """(I, I / H(Y)) from a joint count table [E, Y]; I in nats, or in units of log `base` (2: bits).

    I >= 0 (rounding clamped); the normalised value does not depend on the base."""
    joint = np.asarray(joint, dtype=np.float64)
    n = joint.sum()
    if n == 0:
        return 0.0, 0.0
    p = joint / n
    pe, py = p.sum(axis=1, keepdims=True), p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pe @ py)[nz])).sum())
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum())
    mi = max(mi, 0.0)
    return mi / math.log(base), (mi / hy if hy > 0 else 0.0)


def label_expert_counts(trace: Trace, label: str) -> tuple[list[str], dict[int, np.ndarray]]:
    """labels, {layer: counts [E, Y]} of token-slots per (expert, label)."""
    if label not in trace.label_columns:
        raise ValueError(f"trace has no label column {label!r}; it has {trace.label_columns}")
    labels = [r[0] for r in trace.sql(f'SELECT DISTINCT "{label}" FROM trace ORDER BY 1').fetchall()]
    idx = {v: i for i, v in enumerate(labels)}
    rows = trace.sql(
        f'SELECT layer, expert, "{label}", count(*) FROM trace WHERE expert >= 0 GROUP BY 1, 2, 3'
    ).fetchall()
    out = {layer: np.zeros((trace.num_experts, len(labels)), dtype=np.int64) for layer in trace.layers}
    for layer, e, y, c in rows:
        out[int(layer)][int(e), idx[y]] = c
    return labels, out


def specialization(trace: Trace, label: str = "label", top: int = 3) -> dict:
    """Per layer: MI, normalised MI, the label x expert share table, and per label its top experts by lift
    (the label's share of an expert's slots over the expert's share of all slots)."""
    labels, counts = label_expert_counts(trace, label)
    out = {"labels": labels, "layers": {}}
    for layer, joint in counts.items():
        mi, nmi = mutual_information(joint)
        share = joint / np.maximum(joint.sum(axis=0, keepdims=True), 1)  # [E, Y]: P(e | y)
        overall = joint.sum(axis=1) / max(joint.sum(), 1)  # [E]
        lift = share / np.maximum(overall[:, None], 1e-12)
        tops = {y: [(int(e), float(lift[e, j])) for e in np.argsort(-lift[:, j])[:top]] for j, y in enumerate(labels)}
        out["layers"][layer] = {"mi": mi, "nmi": nmi, "share": share.T.tolist(), "top_experts": tops}
    return out


def preferred_tokens(trace: Trace, top: int = 10, min_count: int = 5) -> dict[int, dict[int, list[tuple[int, float]]]]:
    """Per layer and expert: the token ids it prefers, by lift = P(token | expert) / P(token),
    among tokens seen at least `min_count` times with that expert."""
    out: dict[int, dict[int, list]] = {}
    for layer in trace.layers:
        rows = trace.sql(
            "WITH t AS (SELECT token, expert FROM trace WHERE layer = ? AND expert >= 0), "
            "te AS (SELECT token, expert, count(*) c FROM t GROUP BY 1, 2), "
            "tt AS (SELECT token, count(*) c FROM t GROUP BY 1), "
            "ee AS (SELECT expert, count(*) c FROM t GROUP BY 1), "
            "n AS (SELECT count(*) c FROM t) "
            "SELECT te.expert, te.token, (te.c * 1.0 / ee.c) / (tt.c * 1.0 / n.c) AS lift "
            "FROM te JOIN tt USING (token) JOIN ee USING (expert), n WHERE te.c >= ? "
            "QUALIFY row_number() OVER (PARTITION BY te.expert ORDER BY lift DESC) <= ? ORDER BY 1, 3 DESC",
            [layer, min_count, top],
        ).fetchall()
        per: dict[int, list] = {}
        for e, tok, lift in rows:
            per.setdefault(int(e), []).append((int(tok), float(lift)))
        out[layer] = per
    return out
