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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moekit.analyze.metrics.coactivation import pair_counts
from moekit.infer.cache import ExpertCache, Key, parse_memory
from moekit.layers.activations import get_activation
from moekit.layers.dispatch import autocast_dtype, combine, gather, plan
from moekit.layers.experts import Experts, check_input_dtype
from moekit.layers.fused_mlp import fused_expert_mlp
from moekit.layers.moe import MoE
from moekit.models import MoELM
from moekit.models.lm import rope_tables
from moekit.routing.routing import Routing

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class ExpertLayout:
    """Where one MoE layer's routed experts sit in a checkpoint: `fused` 3-D tensors (expert e is row e of
    each: gate_up_proj or up_proj [E, 2F or F, D], then down_proj [E, D, F]; moekit checkpoints), or
    `per_expert` 2-D tensor names with an `{e}` field (gate, up, down, as the hub layout transformers'
    `save_pretrained` writes; gate None for non-gated experts)."""

    fused: tuple[str, str] | None = None
    per_expert: tuple[str | None, str, str] | None = None

    def names(self, e: int) -> list[str]:
        if self.fused is not None:
            return list(self.fused)
        return [n.format(e=e) for n in self.per_expert if n is not None]


class SafetensorsExperts:
    """Reads single experts out of safetensors files (one or several shards), memory-mapped: a fused
    layout reads `get_slice(name)[e]`, a per-expert layout reads that expert's own tensors (gate and up
    concatenated into the [2F, D] rows of `gate_up_proj`). One handle per file and thread.

    Args:
        files: tensor name -> the file that holds it.
        layouts: MoE layer (block index) -> `ExpertLayout`.
        device: where loaded experts go.
    """

    def __init__(self, files: dict[str, Path], layouts: dict[int, ExpertLayout], device: torch.device) -> None:
        from safetensors import safe_open

        from moekit.hf.inspect import read_header

        self.files, self.layouts, self.device = files, layouts, device
        self._open = safe_open
        self._local = threading.local()
        self.headers: dict[str, dict] = {}
        for f in set(files.values()):
            self.headers.update(read_header(f))
        for layer, lay in layouts.items():
            missing = [n for n in lay.names(0) if n not in files]
            if missing:
                raise ValueError(f"layer {layer}: the checkpoint has no expert tensors {missing[:3]}")

    @classmethod
    def single_file(cls, path: str | Path, layouts: dict[int, ExpertLayout], device: torch.device):
        from moekit.hf.inspect import read_header

        path = Path(path)
        return cls(dict.fromkeys(read_header(path), path), layouts, device)

    def _handle(self, file: Path):
        handles = self._local.__dict__.setdefault("h", {})
        if file not in handles:
            handles[file] = self._open(str(file), framework="pt")
        return handles[file]

    def _bytes(self, name: str, rows: bool) -> int:
        h = self.headers[name]
        shape = h["shape"][1:] if rows else h["shape"]
        return int(np.prod(shape)) * _DTYPE_BYTES[h["dtype"]]

    def entry_bytes(self, key: Key) -> int:
        """Bytes of one expert's tensors (from the file headers, nothing read)."""
        lay = self.layouts[key[0]]
        return sum(self._bytes(n, lay.fused is not None) for n in lay.names(key[1]))

    def dtype(self, layer: int) -> torch.dtype:
        return _TORCH_DTYPES[self.headers[self.layouts[layer].names(0)[-1]]["dtype"]]

    def load(self, key: Key) -> tuple[Tensor, ...]:
        """Expert key[1] of layer key[0]: (first projection [2F or F, D], down_proj [D, F]) on the device."""
        layer, e = key
        lay = self.layouts[layer]
        if lay.fused is not None:
            return tuple(self._handle(self.files[n]).get_slice(n)[e].to(self.device) for n in lay.fused)
        ts = [self._handle(self.files[n]).get_tensor(n) for n in lay.names(e)]
        first = torch.cat(ts[:-1]) if len(ts) == 3 else ts[0]  # gate rows, then up rows
        return first.to(self.device), ts[-1].to(self.device)

    def tensor(self, name: str) -> Tensor:
        return self._handle(self.files[name]).get_tensor(name)


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
        amp = autocast_dtype(x)  # inside torch.autocast the expert matmuls run in its dtype, as in `loop`
        x = (x if amp is None else x.to(amp)).contiguous()
        xs = gather(x, p)  # [N, D] sorted by expert
        ys = xs.new_empty(xs.shape[0], self.dim)
        segs, start = [], 0
        for e, c in enumerate(p.counts):
            if c:
                segs.append((e, start, start + c))
            start += c
        segs.sort(key=lambda s: (self.layer, s[0]) not in cache)  # cached experts first: no load evicts them
        for e, s, t in segs:
            with cache.use((self.layer, e)) as (w1, w2), torch.autocast(x.device.type, enabled=False):
                if amp is not None:
                    w1, w2 = w1.to(amp), w2.to(amp)
                # w1 [2F or F, D], w2 [D, F]: one expert's slice of the fused weights
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


def _offloader(
    reader: SafetensorsExperts, layers: list[int], num_experts: int, k: int, expert_memory: str | int | float,
    policy: str, prefetch: bool, prefetch_k: int | None, calibration: Any,
) -> tuple[ExpertCache, Offloader]:
    """The cache (budget checked against k experts of one layer) and the offloader over it."""
    per_expert = max(reader.entry_bytes((layer, 0)) for layer in layers)
    total = sum(reader.entry_bytes((layer, 0)) for layer in layers) * num_experts
    capacity = parse_memory(expert_memory, total)
    if capacity < k * per_expert:
        raise ValueError(
            f"expert_memory={expert_memory!r} ({capacity} bytes) is smaller than one layer's k={k} active experts "
            f"({k} x {per_expert} = {k * per_expert} bytes); give at least {k * per_expert} bytes"
        )
    cache = ExpertCache(capacity_bytes=capacity, policy=policy, loader=reader.load, entry_bytes=reader.entry_bytes)
    affinity = affinity_from_trace(calibration) if calibration is not None else None
    off = Offloader(
        cache=cache, layers=layers, num_experts=num_experts, prefetch=prefetch, prefetch_k=prefetch_k,
        affinity=affinity,
    )
    return cache, off


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
    if cfg.num_experts_per_layer is not None and len({c for c in cfg.num_experts_per_layer if c}) > 1:
        raise ValueError(f"{ckpt}: offloading needs one expert count in every MoE layer, the model has "
                         f"num_experts_per_layer={cfg.num_experts_per_layer}")
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
    layouts = {i: ExpertLayout(fused=tuple(f"layers.{i}.mlp.experts.{n}" for n in names)) for i, _ in moes}
    reader = SafetensorsExperts.single_file(ckpt / "model.safetensors", layouts, device)
    expert_keys = {n for lay in layouts.values() for n in lay.names(0)}
    layers = [i for i, _ in moes]
    k = max(moe.router.nominal_k for _, moe in moes)
    _, off = _offloader(reader, layers, cfg.num_experts, k, expert_memory, policy, prefetch, prefetch_k, calibration)
    for i, moe in moes:
        moe.experts = OffloadedExperts(like=moe.experts, layer=i, offloader=off, dtype=reader.dtype(i))
    model = model.to_empty(device=device)
    state = {n: reader.tensor(n) for n in set(reader.files) - expert_keys}
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


__all__ = [
    "ExpertLayout", "OffloadedExperts", "Offloader", "SafetensorsExperts", "affinity_from_trace", "load_offloaded",
]
