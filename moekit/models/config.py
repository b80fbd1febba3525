"""The configuration of moekit's decoder-only LM: names and numbers only, so it round-trips JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.layers.activations import ACTIVATIONS
from moekit.layers.dispatch import list_backends
from moekit.routing.capacity import PRIORITIES
from moekit.utils.checks import check_positive_ints

QK_NORMS = ("none", "head", "full")


@dataclass
class LMConfig:
    """A decoder-only transformer whose feed-forward blocks are dense or MoE layers."""

    vocab_size: int = 4096  # tokens in the vocabulary
    dim: int = 256  # model width D
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention; must divide n_heads)
    max_seq_len: int = 256  # longest sequence (RoPE table and KV cache size)
    ffn_hidden: int = 1024  # width of a dense feed-forward block
    activation: str = "silu"  # feed-forward activation; gated (SwiGLU with "silu")
    rope_theta: float = 10_000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    qk_norm: str = "none"  # RMSNorm of q and k before RoPE: "none" | "head" (per head, Qwen3) | "full" (OLMoE)
    tie_embeddings: bool = True  # share the input embedding with the output head
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    # µP-style scale knobs (a tuning sweep searches them; 1.0 = off, bit-identical to a model without them)
    embed_init_mult: float = 1.0  # multiplies the init std of the embedding (and of an untied output head)
    attn_init_mult: float = 1.0  # multiplies the init std of the attention projections (q, k, v, o)
    ffn_init_mult: float = 1.0  # multiplies the init std of feed-forward weights: dense MLP, routed and shared experts
    ffn_out_mult: float = 1.0  # multiplies every feed-forward block's output (dense MLP or whole MoE layer)
    # Mixture of experts: num_experts = 0 means every feed-forward block is dense.
    num_experts: int = 0  # routed experts per MoE layer (E; with num_experts_per_layer, the largest layer's)
    # routed experts of each block (one entry per block, 0 for dense blocks; e.g. after layer-adaptive pruning);
    # None: num_experts in every MoE block
    num_experts_per_layer: list[int] | None = None
    expert_hidden: int = 512  # width of one routed expert (F)
    router: str = "topk"  # registered router name (moekit.routing.list_routers())
    router_args: dict[str, Any] = field(default_factory=lambda: {"k": 2})  # router keyword arguments
    num_shared_experts: int = 0  # always-on shared experts, fused into one MLP of width n * expert_hidden
    shared_gate: bool = False  # Qwen2-MoE sigmoid gate on the shared expert's output
    first_k_dense: int = 0  # the first k blocks keep a dense FFN (DeepSeek)
    moe_every: int = 1  # an MoE FFN in every n-th block after first_k_dense (1 = all)
    capacity_factor: float | None = None  # cap tokens per expert (None = dropless)
    capacity_priority: str = "order"  # which slots win when an expert overflows: "order" | "weight"
    dispatch: str = "auto"  # dispatch backend (moekit.layers.list_backends())
    moe_iterations: int = 1  # Chain-of-Experts: each MoE layer applies its experts this many times, re-routed each time
    experts: str = "ffn"  # routed experts variant: "ffn", "film", "lowrank", ... (layers.variants)
    experts_args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the experts variant
    share_blocks: bool = False  # WideNet: all blocks reuse block 0's attention and FFN/MoE; norms stay per block
    # Mixture-of-Depths (Raposo et al. 2024): in every mod_every-th block a router lets tokens skip the block
    mod_capacity: float = 1.0  # fraction of each sequence's tokens a routed block processes (1.0 = off)
    mod_every: int = 2  # route blocks mod_every-1, 2*mod_every-1, ... (2: every other block, the paper's choice)
    mod_gate: str = "sigmoid"  # how the router score scales the block's update: "sigmoid" | "linear" (paper: r)
    mod_causal: str = "aux_loss"  # per-token decision at inference: "aux_loss" (router logit) | "predictor" (MLP)
    mod_aux_weight: float = 0.01  # weight of the binary cross-entropy loss that trains the causal decision

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "max_seq_len",
            "ffn_hidden",
            "expert_hidden",
            "moe_every",
            "mod_every",
            "moe_iterations",
        ):
            check_positive_ints("LMConfig.", **{name: getattr(self, name)})
        for name in ("embed_init_mult", "attn_init_mult", "ffn_init_mult", "ffn_out_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"LMConfig.{name} must be a finite number > 0 (1.0 = off), got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"LMConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"LMConfig: head width dim/n_heads={self.dim // self.n_heads} must be even (RoPE)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LMConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"LMConfig.qk_norm must be one of {list(QK_NORMS)}, got {self.qk_norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LMConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"LMConfig.num_experts must be an integer >= 0, got {self.num_experts!r}")
        if not isinstance(self.num_shared_experts, int) or self.num_shared_experts < 0:
            raise ValueError(f"LMConfig.num_shared_experts must be >= 0, got {self.num_shared_experts!r}")
        if self.shared_gate and not self.num_shared_experts:
            raise ValueError("LMConfig.shared_gate=True needs num_shared_experts >= 1")
        if not 0 <= self.first_k_dense <= self.n_layers:
            raise ValueError(
                f"LMConfig.first_k_dense must be in [0, n_layers={self.n_layers}], got {self.first_k_dense}"
            )
        if self.dispatch not in list_backends():
            raise ValueError(f"LMConfig.dispatch must be one of {list_backends()}, got {self.dispatch!r}")
        if self.capacity_priority not in PRIORITIES:
            raise ValueError(
                f"LMConfig.capacity_priority must be one of {list(PRIORITIES)}, got {self.capacity_priority!r}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"LMConfig.capacity_factor must be > 0 or None, got {self.capacity_factor!r}")
        if self.share_blocks and (self.first_k_dense or self.moe_every != 1):
            raise ValueError("LMConfig.share_blocks=True (WideNet) needs first_k_dense=0 and moe_every=1")
        from moekit.layers.variants import EXPERTS_VARIANTS

        if self.experts not in EXPERTS_VARIANTS:
            raise ValueError(f"LMConfig.experts must be one of {list(EXPERTS_VARIANTS)}, got {self.experts!r}")
        if not isinstance(self.experts_args, dict):
            raise ValueError(f"LMConfig.experts_args must be a dict, got {type(self.experts_args).__name__}")
        self._check_depth()
        self._check_per_layer()
        if not isinstance(self.router_args, dict):
            raise ValueError(f"LMConfig.router_args must be a dict, got {type(self.router_args).__name__}")
        if self.num_experts:
            from moekit.routing import get_router

            get_router(self.router)  # unknown names list the known ones

    def _check_per_layer(self) -> None:
        counts = self.num_experts_per_layer
        if counts is None:
            return
        want = [self.num_experts if self.is_moe_layer(i) else 0 for i in range(self.n_layers)]
        ok = isinstance(counts, list) and len(counts) == self.n_layers and all(
            isinstance(c, int) and not isinstance(c, bool) and (c >= 1 if w else c == 0)
            for c, w in zip(counts, want, strict=False))
        if not ok or not self.num_experts or max(counts) != self.num_experts:
            raise ValueError(
                f"LMConfig.num_experts_per_layer must be None or a list of {self.n_layers} integers (one per block: "
                f">= 1 for MoE blocks, 0 for dense blocks {[i for i, w in enumerate(want) if not w]}) whose largest is "
                f"num_experts={self.num_experts}, got {counts!r}"
            )
        if self.share_blocks:
            raise ValueError("LMConfig.num_experts_per_layer needs share_blocks=False (WideNet shares one MoE layer)")

    def experts_in(self, layer: int) -> int:
        """Routed experts of block `layer`'s MoE layer (0 for a dense block)."""
        if not self.is_moe_layer(layer):
            return 0
        return self.num_experts if self.num_experts_per_layer is None else self.num_experts_per_layer[layer]

    def _check_depth(self) -> None:
        from moekit.models.depth import MOD_CAUSAL, MOD_GATES

        c = self.mod_capacity
        if isinstance(c, bool) or not isinstance(c, int | float) or not 0 < c <= 1:
            raise ValueError(f"LMConfig.mod_capacity must be in (0, 1] (1 = no mixture-of-depths), got {c!r}")
        if self.mod_gate not in MOD_GATES:
            raise ValueError(f"LMConfig.mod_gate must be one of {list(MOD_GATES)}, got {self.mod_gate!r}")
        if self.mod_causal not in MOD_CAUSAL:
            raise ValueError(f"LMConfig.mod_causal must be one of {list(MOD_CAUSAL)}, got {self.mod_causal!r}")
        if not self.mod_aux_weight >= 0:
            raise ValueError(f"LMConfig.mod_aux_weight must be >= 0, got {self.mod_aux_weight!r}")
        if c < 1 and not any(self.is_depth_layer(i) for i in range(self.n_layers)):
            raise ValueError(
                f"LMConfig: mod_capacity={c} routes blocks mod_every-1, 2*mod_every-1, ... but mod_every="
                f"{self.mod_every} > n_layers={self.n_layers} leaves none"
            )
        if c < 1 and self.num_experts:
            # A mixture-of-depths block routes a varying subset of each sequence's tokens: parts that need whole
            # sequences, or the previous layer's routing of the same tokens, say so (Router / experts attributes).
            from moekit.layers.variants import EXPERTS_VARIANTS
            from moekit.routing import get_router

            router = get_router(self.router)
            need = None
            if getattr(router, "needs_full_sequence", False):
                need = "whole sequences"
            elif getattr(router, "needs_previous", False):
                need = "the previous MoE layer's routing of the same tokens"
            if need is not None:
                raise ValueError(
                    f"LMConfig: router {self.router!r} needs {need}, which a mixture-of-depths block "
                    "(mod_capacity < 1) does not give it"
                )
            if getattr(EXPERTS_VARIANTS.get(self.experts), "needs_full_sequence", False):
                raise ValueError(
                    f"LMConfig: experts={self.experts!r} needs whole sequences, which a mixture-of-depths block "
                    "(mod_capacity < 1) does not give it"
                )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether block i has an MoE feed-forward."""
        return self.num_experts > 0 and i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_every == 0

    def is_depth_layer(self, i: int) -> bool:
        """Whether block i is a mixture-of-depths block (a router decides which tokens it processes)."""
        return self.mod_capacity < 1 and (i + 1) % self.mod_every == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Inverse of to_dict; unknown keys are an error that lists the valid ones."""
        from moekit.utils.dataclass import from_dict_strict

        return from_dict_strict(cls, d)

    def save(self, path: str | Path) -> None:
        """Write config.json (atomically)."""
        from moekit.utils.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> LMConfig:
        """Read config.json."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no model config at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def replace(self, **changes: Any) -> LMConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
