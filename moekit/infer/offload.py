"""Expert offloading: run a moekit MoE LM whose routed experts' weights are not resident.

The non-expert weights (embeddings, attention, norms, routers, shared experts) are loaded; each
routed expert's weights are read on demand from the checkpoint's safetensors file by
`safetensors.safe_open` slices (memory-mapped: one expert's rows, never the whole tensor) into an
`ExpertCache` of fixed size in bytes, evicted by LRU or LFU. Optionally a background thread
prefetches the experts layer l+1 will likely use while layer l computes, from the inter-layer
affinity of ExFlow (Yao et al. 2024, "Exploiting Inter-Layer Expert Affinity for Accelerating
Mixture-of-Experts Model Inference"): counts C_l[i, j] of tokens routed to expert i at layer l and
j at the next MoE layer, from a calibration trace (`moekit analyze`'s trace.parquet) and updated
online from the routing the model produces. Given the experts a layer chose, the next layer's
experts are ranked by sum_i P(j | i) and the top `prefetch_k` are loaded ahead (the offloading
systems MoE-Infinity, Fiddler and mixtral-offloading cache and prefetch the same way).

Results equal the fully resident model exactly: each expert's rows are computed by the same per-
expert matmuls as the `loop` dispatch backend and summed back by the same `combine` (DESIGN.md,
contract 3). (A resident model on CUDA in 16-bit uses `grouped` by default, whose matmuls may differ
from `loop` in the last bit; compare against `dispatch="loop"` there.)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.analyze.metrics.coactivation import pair_counts
from moekit.infer.cache import ExpertCache, Key, parse_memory
from moekit.layers.activations import get_activation
from moekit.layers.dispatch import combine, gather, plan
from moekit.layers.experts import Experts, check_input_dtype
from moekit.layers.fused_mlp import fused_expert_mlp
from moekit.layers.moe import MoE
from moekit.models import MoELM
from moekit.models.lm import rope_tables
from moekit.routing.routing import Routing

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


class SafetensorsExperts:
    """Reads single experts out of a safetensors file: expert e of layer l is row e of each tensor
    `layers.{l}.mlp.experts.{name}` (name: gate_up_proj or up_proj, then down_proj). One memory-mapped
    handle per thread."""

    def __init__(self, path: str | Path, names: tuple[str, ...], device: torch.device) -> None:
        from safetensors import safe_open

        self.path, self.names, self.device = Path(path), names, device
        self._open = safe_open
        self._local = threading.local()
        with safe_open(str(self.path), framework="pt") as f:
            self.keys = set(f.keys())
            self.shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in self.keys}

    def _handle(self):
        h = getattr(self._local, "h", None)
        if h is None:
            h = self._local.h = self._open(str(self.path), framework="pt")
        return h

    def tensor_names(self, layer: int) -> list[str]:
        return [f"layers.{layer}.mlp.experts.{n}" for n in self.names]

    def entry_bytes(self, key: Key) -> int:
        """Bytes of one expert's tensors (from the file header, nothing read)."""
        total = 0
        for name in self.tensor_names(key[0]):
            shape, dtype = self.shapes[name]
            total += int(np.prod(shape[1:])) * _DTYPE_BYTES[dtype]
        return total

    def load(self, key: Key) -> tuple[Tensor, ...]:
        """Expert key[1] of layer key[0]: one [rows, cols] tensor per name, on the device."""
        h = self._handle()
        layer, e = key
        return tuple(h.get_slice(n)[e].to(self.device) for n in self.tensor_names(layer))

    def tensor(self, name: str) -> Tensor:
        return self._handle().get_tensor(name)


class Offloader:
    """The shared state of an offloaded model: the cache, the MoE layer order, the affinity counts and the
    prefetch thread. Reached as `model.offloader` after `load_offloaded`."""

    def __init__(
        self,
        *,
        cache: ExpertCache,
        layers: list[int],
        num_experts: int,
        prefetch: bool,
        prefetch_k: int | None,
        affinity: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.cache = cache
        self.layers = layers
        self.num_experts = num_experts
        self.next_layer = dict(zip(layers, layers[1:], strict=False))
        self.prev_layer = {b: a for a, b in self.next_layer.items()}
        E = num_experts
        self.affinity = {l: np.zeros((E, E), np.float64) for l in layers[:-1]}
        for l, c in (affinity or {}).items():
            if l in self.affinity:
                self.affinity[l] += c
        self.prefetch_k = prefetch_k
        self.last_ids: dict[int, np.ndarray] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="moekit-prefetch") if prefetch else None
        self.pending: list = []

    @property
    def stats(self):
        """The cache's counters (`CacheStats`)."""
        return self.cache.stats

    def before_layer(self, layer: int, expert_ids: Tensor) -> None:
        """Called by a layer once its routing is known: update the affinity from the previous layer's
        choices on the same tokens, then start prefetching the next layer's likely experts."""
        if self.pool is None:
            return
        ids = expert_ids.detach().cpu().numpy()
        prev = self.prev_layer.get(layer)
        if prev is not None and prev in self.last_ids and self.last_ids[prev].shape[0] == ids.shape[0]:
            self.affinity[prev] += pair_counts(self.last_ids[prev], ids, self.num_experts)
        self.last_ids[layer] = ids
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return
        C = self.affinity[layer]
        P = C / np.maximum(C.sum(axis=1, keepdims=True), 1)  # P(j at next | i here)
        chosen = ids[ids >= 0]
        if chosen.size == 0:
            return
        score = P[chosen].sum(axis=0)  # [E]
        k = self.prefetch_k or ids.shape[1]
        order = np.argsort(-score, kind="stable")[:k]
        keys = [(nxt, int(j)) for j in order if score[j] > 0]
        self.pending = [f for f in self.pending if not f.done()]
        for key in keys:
            self.pending.append(self.pool.submit(self.cache.prefetch, key))

    def wait(self) -> None:
        """Block until every submitted prefetch finished (re-raising a failed one)."""
        for f in self.pending:
            f.result()
        self.pending = []

    def close(self) -> None:
        """Stop the prefetch thread."""
        if self.pool is not None:
            self.wait()
            self.pool.shutdown(wait=True)
            self.pool = None


class OffloadedExperts(nn.Module):
    """Stands in for an `Experts` module whose weights live in the checkpoint file; `forward(x, routing,
    layer=)` computes as the `loop` backend does, fetching each chosen expert from the cache.

    Attributes mirror `Experts` (num_experts, dim, hidden, gated, act, weight_dtype) so layer code and
    traces keep working; there are no parameters."""

    def __init__(self, *, like: Experts, layer: int, offloader: Offloader, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = like.num_experts, like.dim, like.hidden
        self.activation, self.gated, self.backend = like.activation, like.gated, "loop"
        self.act = get_activation(like.activation, **like.act.args())
        self.layer = layer
        self.offloader = offloader
        self._dtype = dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, x: Tensor, routing: Routing, *, layer: int | None = None) -> Tensor:
        """x: [T, D], routing [T, k] -> [T, D], exactly `Experts(backend="loop")` on the same weights."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"OffloadedExperts: expected input [T, {self.dim}], got {tuple(x.shape)}")
        check_input_dtype("OffloadedExperts", x, self._dtype)
        off, cache = self.offloader, self.offloader.cache
        off.before_layer(self.layer, routing.expert_ids)
        p = plan(routing.expert_ids, self.num_experts)
        x = x.contiguous()
        xs = gather(x, p)  # [N, D] sorted by expert
        ys = xs.new_empty(xs.shape[0], self.dim)
        segs, start = [], 0
        for e, c in enumerate(p.counts):
            if c:
                segs.append((e, start, start + c))
            start += c
        segs.sort(key=lambda s: (self.layer, s[0]) not in cache)  # cached experts first: no load evicts them
        for e, s, t in segs:
            with cache.use((self.layer, e)) as (w1, w2):  # [2F or F, D], [D, F]
                ys[s:t] = fused_expert_mlp(xs[s:t], w1[None], w2[None], [t - s], self.act, self.gated)
        return combine(ys, p, routing.weights, x.shape[0])

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"


def affinity_from_trace(trace: Any) -> dict[int, np.ndarray]:
    """Counts C_l [E, E] of (expert i at layer l -> expert j at the next traced layer), per layer l, from a
    routing trace (a path to trace.parquet or a `moekit.analyze.table.Trace`)."""
    from moekit.analyze.table import Trace

    t = trace if isinstance(trace, Trace) else Trace(trace)
    out = {}
    for l0, l1 in zip(t.layers, t.layers[1:], strict=False):
        a, b = t.layer(l0), t.layer(l1)
        if a.experts.shape != b.experts.shape:
            continue  # a mixture-of-depths layer: tokens differ
        out[l0] = pair_counts(a.experts, b.experts, t.num_experts).astype(np.float64)
    return out


def load_offloaded(
    path: str | Path,
    *,
    expert_memory: str | int | float,
    policy: str = "lru",
    prefetch: bool = False,
    prefetch_k: int | None = None,
    calibration: Any = None,
    device: str | torch.device = "cpu",
) -> MoELM:
    """A moekit MoE LM from a run (or checkpoint) folder with its routed experts offloaded.

    Args:
        path: run directory or checkpoint folder (model.safetensors + config.json).
        expert_memory: the expert cache's budget: bytes, "200MB"/"1GiB", "50%" or a fraction of all experts.
        policy: eviction policy (`moekit.infer.policies.list_policies()`: "lru", "lfu").
        prefetch: load the next layer's likely experts in a background thread (inter-layer affinity).
        prefetch_k: experts prefetched per layer (default: the layer's k).
        calibration: a routing trace (trace.parquet path or `Trace`) whose affinity seeds the prefetcher;
            without one it learns online from the model's own routing.
        device: where the model and the cache live.

    Returns the model (eval mode); `model.offloader` holds the cache and its `stats`. A budget smaller
    than one layer's k experts raises ValueError.
    """
    from moekit.train.checkpoint import checkpoint_dir, read_model_config

    ckpt = checkpoint_dir(path)
    cfg = read_model_config(ckpt)
    if not cfg.num_experts:
        raise ValueError(f"{ckpt}: a dense model has no experts to offload")
    if cfg.experts != "ffn" or cfg.share_blocks:
        raise ValueError(
            f"{ckpt}: offloading supports experts='ffn' without share_blocks, got experts={cfg.experts!r}, "
            f"share_blocks={cfg.share_blocks}"
        )
    device = torch.device(device)
    with torch.device("meta"):
        model = MoELM(cfg)
    moes = [(i, b.mlp) for i, b in enumerate(model.layers) if isinstance(b.mlp, MoE)]
    first = moes[0][1].experts
    names = ("gate_up_proj" if first.gated else "up_proj", "down_proj")
    reader = SafetensorsExperts(ckpt / "model.safetensors", names, device)
    expert_keys = {n for i, _ in moes for n in reader.tensor_names(i)}
    missing = sorted(expert_keys - reader.keys)
    if missing:
        raise ValueError(f"{ckpt / 'model.safetensors'}: missing expert tensors {missing[:3]}")
    layers = [i for i, _ in moes]
    per_expert = reader.entry_bytes((layers[0], 0))
    total = per_expert * cfg.num_experts * len(layers)
    capacity = parse_memory(expert_memory, total)
    k = max(moe.router.nominal_k for _, moe in moes)
    if capacity < k * per_expert:
        raise ValueError(
            f"expert_memory={expert_memory!r} ({capacity} bytes) is smaller than one layer's k={k} active experts "
            f"({k} x {per_expert} = {k * per_expert} bytes); give at least {k * per_expert} bytes"
        )
    cache = ExpertCache(capacity_bytes=capacity, policy=policy, loader=reader.load, entry_bytes=reader.entry_bytes)
    affinity = affinity_from_trace(calibration) if calibration is not None else None
    off = Offloader(
        cache=cache, layers=layers, num_experts=cfg.num_experts, prefetch=prefetch, prefetch_k=prefetch_k,
        affinity=affinity,
    )
    dtype_name = reader.shapes[reader.tensor_names(layers[0])[0]][1]
    dtype = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype_name]
    for i, moe in moes:
        moe.experts = OffloadedExperts(like=moe.experts, layer=i, offloader=off, dtype=dtype)
    model = model.to_empty(device=device)
    state = {n: reader.tensor(n) for n in reader.keys - expert_keys}
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    if set(state) != expected:
        raise ValueError(
            f"{ckpt / 'model.safetensors'} does not match its config: missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.to(device)
    cos, sin = rope_tables(cfg, device)
    model.rope_cos, model.rope_sin = cos, sin
    model.offloader = off
    return model.eval()


__all__ = ["OffloadedExperts", "Offloader", "SafetensorsExperts", "affinity_from_trace", "load_offloaded"]
