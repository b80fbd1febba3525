"""Expert load and router confidence.

Load balance as in Fedus et al. 2021 ("Switch Transformers") and Lepikhin et al. 2020 ("GShard"):
token-slots per expert; we report max/mean, the coefficient of variation (std/mean) and the entropy
of the load distribution normalised by log E (1.0 = perfectly even).
"""

from __future__ import annotations

import numpy as np

from moekit.analyze.table import Trace


def load_stats(counts: np.ndarray) -> dict[str, float]:
    """Summary of one layer's counts [E]."""
    counts = np.asarray(counts, dtype=np.float64)
    E = len(counts)
    mean = counts.mean() if E else 0.0
    p = counts / counts.sum() if counts.sum() else np.full(E, 1.0 / max(E, 1))
    nz = p[p > 0]
    return {
        "max_over_mean": float(counts.max() / mean) if mean else float("nan"),
        "cv": float(counts.std() / mean) if mean else float("nan"),
        "entropy_norm": float(-(nz * np.log(nz)).sum() / np.log(E)) if E > 1 else 1.0,
    }


def expert_load(trace: Trace) -> dict:
    """Per layer: counts [E], max/mean, CV, normalised entropy, empty slots, router confidence."""
    E = trace.num_experts
    rows = trace.sql(
        "SELECT layer, expert, count(*) FROM trace GROUP BY layer, expert ORDER BY layer, expert"
    ).fetchall()
    conf = {
        int(r[0]): (float(r[1]), float(r[2]))
        for r in trace.sql(
            "SELECT layer, avg(p_top1), avg(entropy) FROM trace WHERE slot = 0 GROUP BY layer"
        ).fetchall()
    }
    out: dict[int, dict] = {}
    for layer in trace.layers:
        counts = np.zeros(E, dtype=np.int64)
        empty = 0
        for lay, e, c in rows:
            if lay != layer:
                continue
            if e < 0:
                empty += c
            else:
                counts[e] = c
        total = counts.sum() + empty
        out[layer] = {
            "counts": counts.tolist(),
            **load_stats(counts),
            "empty_slots": int(empty),
            "empty_frac": float(empty / total) if total else 0.0,
            "mean_top1_prob": conf.get(layer, (float("nan"),) * 2)[0],
            "mean_router_entropy": conf.get(layer, (float("nan"),) * 2)[1],
        }
    return out
