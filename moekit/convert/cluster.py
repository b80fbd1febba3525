"""Balanced k-means: N points into K clusters of exactly N/K points each (MoEfication's expert construction,
Zhang et al. 2022, splits F neurons into E experts of F/E this way).

Lloyd iterations whose assignment step is a capacity-constrained greedy matching: all (point, cluster) pairs
in order of increasing squared distance, each point taking the nearest cluster that still has room. The
centroids are then the means of their clusters; it stops when the assignment no longer changes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def balanced_assign(dist: Tensor, size: int) -> Tensor:
    """dist [N, K] (squared distances) -> labels LongTensor [N], each cluster taking exactly `size` points
    (N = K * size): pairs are taken in order of increasing distance, a point by the first cluster with room."""
    N, K = dist.shape
    if N != K * size:
        raise ValueError(f"balanced_assign: {N} points do not fill {K} clusters of {size}")
    order = torch.argsort(dist.reshape(-1), stable=True).tolist()
    labels = [-1] * N
    room = [size] * K
    left = N
    for flat in order:
        i, c = divmod(flat, K)
        if labels[i] < 0 and room[c]:
            labels[i] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(points: Tensor, k: int, *, iters: int = 25, seed: int = 0) -> Tensor:
    """points [N, d] -> labels LongTensor [N] in [0, k), every cluster of size N / k (k must divide N).
    Seeded: initial centroids are k distinct points drawn with `seed`."""
    if points.dim() != 2:
        raise ValueError(f"balanced_kmeans: expected points [N, d], got shape {tuple(points.shape)}")
    N = points.shape[0]
    if not isinstance(k, int) or k < 1 or N % k:
        raise ValueError(f"balanced_kmeans: k={k!r} must be a positive integer dividing the {N} points")
    if iters < 1:
        raise ValueError(f"balanced_kmeans: iters must be >= 1, got {iters}")
    x = points.float()
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(N, generator=gen)[:k]].clone()  # [k, d]
    labels = None
    for _ in range(iters):
        dist = torch.cdist(x, centroids).square()  # [N, k]
        new = balanced_assign(dist, N // k)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / (N // k)
    return labels
