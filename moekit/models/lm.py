"""moekit's decoder-only LM: RMSNorm, rotary positions, grouped-query attention through
`scaled_dot_product_attention`, and per block a dense SwiGLU or an MoE feed-forward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers import MLP, MoE
from moekit.layers.chain import ChainMoE
from moekit.layers.variants import build_experts
from moekit.models.config import LMConfig
from moekit.routing import Routing, build_router


def rope_tables(cfg: LMConfig, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin [max_seq_len, head_dim] in the Hugging Face (rotate-half) layout."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))  # [hd/2]
    t = torch.arange(cfg.max_seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv)  # [S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, L, hd], cos/sin: [L, hd] -> rotated x."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Preallocated keys and values per block: [B, n_kv_heads, max_seq_len, head_dim]."""

    def __init__(self, cfg: LMConfig, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # positions filled


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions (q/k/v/o projections, HF names)."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        if cfg.qk_norm != "none":  # "head": over each head's hd features; "full": over the whole projection
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(hd if per_head else cfg.n_heads * hd, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(hd if per_head else cfg.n_kv_heads * hd, eps=cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        """x: [B, L, D] -> [B, L, D]; with a cache, x holds positions cache.length .. cache.length+L-1."""
        B, L, _ = x.shape
        cfg = self.cfg
        q, k = self.q_proj(x), self.k_proj(x)  # [B, L, H*hd], [B, L, KV*hd]
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, L, cfg.n_heads, cfg.head_dim)
        k = k.view(B, L, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, L, hd], [B, KV, L, hd]
        v = self.v_proj(x).view(B, L, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            k_all, v_all = cache.k[layer][:, :, : start + L], cache.v[layer][:, :, : start + L]
            # query i (absolute position start+i) sees keys 0..start+i
            mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
            out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, cfg.n_heads * cfg.head_dim))


def routed_experts(cfg: LMConfig) -> nn.Module:
    """The routed experts of an MoE layer: `Experts`, or the variant named by `cfg.experts`."""
    return build_experts(
        cfg.experts, num_experts=cfg.num_experts, dim=cfg.dim, hidden=cfg.expert_hidden, activation=cfg.activation,
        backend=cfg.dispatch, **cfg.experts_args,
    )


def build_ffn(cfg: LMConfig, layer: int) -> nn.Module:
    """The feed-forward of block `layer`: an MoE layer or a dense MLP, from the config."""
    if not cfg.is_moe_layer(layer):
        return MLP(dim=cfg.dim, hidden=cfg.ffn_hidden, activation=cfg.activation)
    shared = None
    if cfg.num_shared_experts:
        shared = MLP(dim=cfg.dim, hidden=cfg.num_shared_experts * cfg.expert_hidden, activation=cfg.activation)
    if cfg.moe_iterations > 1:  # Chain-of-Experts: one router per iteration, experts shared
        return ChainMoE(
            routers=[
                build_router(cfg.router, dim=cfg.dim, num_experts=cfg.num_experts, **cfg.router_args)
                for _ in range(cfg.moe_iterations)
            ],
            experts=routed_experts(cfg),
            shared_experts=shared,
        )
    return MoE(
        router=build_router(cfg.router, dim=cfg.dim, num_experts=cfg.num_experts, **cfg.router_args),
        experts=routed_experts(cfg),
        shared_experts=shared,
        shared_gate=cfg.shared_gate,
        capacity_factor=cfg.capacity_factor,
        capacity_priority=cfg.capacity_priority,
    )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = build_ffn(cfg, layer)

    def share_from(self, other: Block) -> None:
        """Use `other`'s attention and feed-forward, keep this block's norms (WideNet, Xue et al. 2022).
        The shared modules stay registered under `other` only: they appear once in state_dict()."""
        del self._modules["self_attn"], self._modules["mlp"]
        object.__setattr__(self, "self_attn", other.self_attn)
        object.__setattr__(self, "mlp", other.mlp)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, state: dict
    ) -> tuple[Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE | ChainMoE):
            y, routing = self.mlp(h, state=state)
            return x + y, routing
        return x + self.mlp(h), None


@dataclass
class LMOutput:
    """What the LM returns."""

    logits: Tensor  # [B, L, vocab]
    loss: Tensor | None = None  # mean next-token cross-entropy (when targets were given)
    aux_loss: Tensor | None = None  # sum of every MoE layer's auxiliary losses (None for dense models)
    routings: list[Routing | None] = field(default_factory=list)  # per block; None for dense blocks


class MoELM(nn.Module):
    """Decoder-only LM; `config` says which blocks are MoE. Parameter names follow Hugging Face
    Llama/Qwen conventions (`model.layers.{i}.self_attn.q_proj`, ...) without the `model.` prefix."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        if config.share_blocks:  # WideNet: one attention and one FFN/MoE for every block, norms per block
            for block in self.layers[1:]:
                block.share_from(self.layers[0])
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linears and embeddings; output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones
            s = (
                std / math.sqrt(2 * self.config.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                else std
            )
            nn.init.normal_(p, std=s)

    def forward(
        self,
        input_ids: Tensor,
        *,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> LMOutput:
        """input_ids: [B, L] -> LMOutput (logits [B, L, V]; loss when targets [B, L] are given,
        ignoring target -100). With a cache, the ids continue the cached sequence."""
        if input_ids.dim() != 2:
            raise ValueError(f"MoELM: expected input_ids [B, L], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + L > self.config.max_seq_len:
            raise ValueError(f"MoELM: sequence of {start + L} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"MoELM: token ids must be in [0, {self.config.vocab_size})")
        cos, sin = self.rope_cos[start : start + L], self.rope_sin[start : start + L]
        x = self.embed_tokens(input_ids)  # [B, L, D]
        state = {"token_ids": input_ids}
        routings: list[Routing | None] = []
        for block in self.layers:
            x, routing = block(x, cos, sin, cache, state)
            routings.append(routing)
            if routing is not None and routing.state is not None:
                state = {**state, "prev": routing.state}
        if cache is not None:
            cache.length += L
        logits = self.lm_head(self.norm(x))  # [B, L, V]
        aux = [r.total_aux() for r in routings if r is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss, routings=routings)

    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for `batch` sequences."""
        p = self.embed_tokens.weight
        return KVCache(self.config, batch, p.device, p.dtype)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """KV-cached sampling. prompt: [B, L] -> [B, L + n]. temperature 0 = greedy; top_p < 1 =
        nucleus sampling. Stops early when every sequence produced `eos_id`."""
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"generate: expected a non-empty prompt [B, L], got shape {tuple(prompt.shape)}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        max_new_tokens = min(max_new_tokens, self.config.max_seq_len - prompt.shape[1])
        cache = self.new_cache(prompt.shape[0])
        out = prompt
        logits = self(prompt, cache=cache).logits[:, -1]  # [B, V]
        done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)  # [B]
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos_id is not None and bool(done.all()):
                break
            if out.shape[1] >= self.config.max_seq_len:
                break
            logits = self(nxt[:, None], cache=cache).logits[:, -1]
        return out


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # smallest prefix with mass >= top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
