"""A synthetic routing table whose best policy is known."""

from __future__ import annotations

import numpy as np

from moekit.llmroute.table import RoutingTable

_POOLS = {
    # category: (words, quality of (weak, strong))
    "math": ("integral derivative equation solve algebra matrix polynomial theorem prove calculus".split(), (0, 1)),
    "chat": ("hello joke weather friend favourite movie recipe holiday music weekend".split(), (1, 1)),
}


def make_synthetic(n_per_cat: int = 60, seed: int = 0) -> RoutingTable:
    """Two categories: "math" only the strong model answers; "chat" both do (so the weak one is best).

    Weak costs 0.1, strong 1.0 per query. Best policy at a small cost weight: math -> strong, chat -> weak.
    """
    rng = np.random.default_rng(seed)
    queries, quality, cats = [], [], []
    for cat, (words, q) in _POOLS.items():
        for _ in range(n_per_cat):
            queries.append(" ".join(rng.choice(words, size=6)))
            quality.append(q)
            cats.append(cat)
    perm = rng.permutation(len(queries))
    quality = np.asarray(quality, float)[perm]
    return RoutingTable(
        queries=[queries[i] for i in perm],
        models=["weak", "strong"],
        quality=quality,
        cost=np.tile([0.1, 1.0], (len(queries), 1)),
        categories=[cats[i] for i in perm],
    )


def best_policy(table: RoutingTable) -> np.ndarray:
    """[Q] the known best choice at a small cost weight: strong (1) for math, weak (0) for chat."""
    return np.asarray([1 if c == "math" else 0 for c in table.categories])
