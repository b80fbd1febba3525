"""moekit's decoder-only LM: RMSNorm, rotary positions, grouped-query attention through
`scaled_dot_product_attention`, and per block a dense SwiGLU or an MoE feed-forward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers import MLP, MoE
from moekit.layers.variants import build_experts
from moekit.models.config import LMConfig
from moekit.models.depth import DepthRouter, gather_selected
from moekit.routing import Routing, RoutingContext, build_router


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
        # mixture-of-depths blocks: keys cached per sequence ([B] counts; the block processed only some tokens)
        self.depth_len: dict[int, Tensor] = {}
        # per-layer recurrent states of modules that carry one across calls (Hecto's GRU expert),
        # keyed by (block index, name); each module owns its entries
        self.states: dict[tuple[int, str], Tensor] = {}


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

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, L, D], cos/sin: [L, hd] or per sequence [B, L, hd] -> q [B, H, L, hd], k and v [B, KV, L, hd]."""
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
        if cos.dim() == 3:  # per-sequence positions (mixture-of-depths subsets): broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out(self, o: Tensor) -> Tensor:
        """Attention output [B, H, L, hd] -> [B, L, D]."""
        B, _, L, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.cfg.n_heads * self.cfg.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int) -> Tensor:
        """x: [B, L, D] -> [B, L, D]; with a cache, x holds positions cache.length .. cache.length+L-1."""
        L = x.shape[1]
        q, k, v = self.qkv(x, cos, sin)
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
        return self.out(out)

    def forward_subset(
        self, x: Tensor, cos: Tensor, sin: Tensor, valid: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        """Causal attention among a subset of each sequence's tokens (a mixture-of-depths block).

        x: [B, K, D], the selected tokens in time order, padded at the end; cos/sin: [B, K, hd] at their
        positions; valid: [B, K] (False = padding, whose output is garbage and must be discarded). With a
        cache, the keys of the tokens this block processed before (their number per sequence is
        `cache.depth_len[layer]`) come first and the valid new keys are appended after them."""
        B, K, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is None:
            if bool(valid.all()):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                return self.out(out)
            before = torch.ones(K, K, dtype=torch.bool, device=x.device).tril()
            mask = before[None] & valid[:, None, :]  # [B, K, K]: earlier valid keys
            k_all, v_all = k, v
        else:
            old = cache.depth_len.get(layer)
            old = torch.zeros(B, dtype=torch.long, device=x.device) if old is None else old
            slots = old[:, None] + torch.arange(K, device=x.device)[None, :]  # [B, K]: cache slot of each token
            b_i, j_i = valid.nonzero(as_tuple=True)
            cache.k[layer][b_i, :, slots[b_i, j_i]] = k[b_i, :, j_i]
            cache.v[layer][b_i, :, slots[b_i, j_i]] = v[b_i, :, j_i]
            new = old + valid.sum(dim=1)
            cache.depth_len[layer] = new
            S = int(new.max())
            s = torch.arange(S, device=x.device)
            mask = (s[None, None, :] <= slots[:, :, None]) & (s[None, None, :] < new[:, None, None])  # [B, K, S]
            k_all, v_all = cache.k[layer][:, :, :S], cache.v[layer][:, :, :S]
        mask = mask | (torch.arange(mask.shape[-1], device=x.device) == 0)  # padding rows never see no key
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None], enable_gqa=True)
        return self.out(out)


def routed_experts(cfg: LMConfig, layer: int | None = None) -> nn.Module:
    """The routed experts of the MoE layer of block `layer`: `Experts`, or the variant named by `cfg.experts`
    (`cfg.experts_in(layer)` experts; `cfg.num_experts` when no block is given)."""
    E = cfg.experts_in(layer) if layer is not None else cfg.num_experts
    return build_experts(
        cfg.experts, num_experts=E, dim=cfg.dim, hidden=cfg.expert_hidden, activation=cfg.activation,
        backend=cfg.dispatch, layer=layer, **cfg.experts_args,
    )


def build_ffn(cfg: LMConfig, layer: int) -> nn.Module:
    """The feed-forward of block `layer`: an MoE layer or a dense MLP, from the config."""
    if not cfg.is_moe_layer(layer):
        return MLP(dim=cfg.dim, hidden=cfg.ffn_hidden, activation=cfg.activation)
    shared = None
    if cfg.num_shared_experts:
        shared = MLP(dim=cfg.dim, hidden=cfg.num_shared_experts * cfg.expert_hidden, activation=cfg.activation)
    routers = [
        build_router(cfg.router, dim=cfg.dim, num_experts=cfg.experts_in(layer), **cfg.router_args)
        for _ in range(cfg.moe_iterations)
    ]
    return MoE(
        # Chain-of-Experts (moe_iterations > 1): one router per iteration, the experts shared
        router=routers if cfg.moe_iterations > 1 else routers[0],
        experts=routed_experts(cfg, layer),
        shared_experts=shared,
        shared_gate=cfg.shared_gate,
        capacity_factor=cfg.capacity_factor,
        capacity_priority=cfg.capacity_priority,
    )


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x)). A mixture-of-depths block
    (`LMConfig.mod_capacity` < 1) also has a `depth_router` and updates only the tokens it selects."""

    def __init__(self, cfg: LMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = build_ffn(cfg, layer)
        self.ffn_out_mult = cfg.ffn_out_mult
        self.depth_router = None
        if cfg.is_depth_layer(layer):
            self.depth_router = DepthRouter(
                dim=cfg.dim, capacity=cfg.mod_capacity, gate=cfg.mod_gate, causal=cfg.mod_causal,
                aux_weight=cfg.mod_aux_weight,
            )

    def share_from(self, other: Block) -> None:
        """Use `other`'s attention and feed-forward, keep this block's norms (WideNet, Xue et al. 2022).
        The shared modules stay registered under `other` only: they appear once in state_dict()."""
        del self._modules["self_attn"], self._modules["mlp"]
        object.__setattr__(self, "self_attn", other.self_attn)
        object.__setattr__(self, "mlp", other.mlp)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        context: RoutingContext,
        selection: str = "topk",
    ) -> BlockOutput:
        """x: [B, L, D], cos/sin [L, hd] of its positions, `context` what the routers may read about the B*L
        tokens -> BlockOutput. `selection` ("topk" | "causal") is how a mixture-of-depths block picks its tokens."""
        if self.depth_router is not None:
            return self._forward_depth(x, cos, sin, cache, context, selection)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer)
        y, routing = self._ffn(self.post_attention_layernorm(x), context, cache)
        return BlockOutput(x + y, routing)

    def _ffn(self, h: Tensor, context: RoutingContext, cache: KVCache | None) -> tuple[Tensor, Routing | None]:
        """The feed-forward's output (times `LMConfig.ffn_out_mult`) and its routing (None when dense)."""
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h, context=context, cache=cache, layer=self.layer)
        else:
            y, routing = self.mlp(h), None
        return (y * self.ffn_out_mult if self.ffn_out_mult != 1 else y), routing

    def _forward_depth(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, context: RoutingContext, selection: str
    ) -> BlockOutput:
        """Mixture-of-depths: attention and feed-forward over the selected tokens only, their update scaled by
        the router's gate and added back; the other tokens pass unchanged."""
        B, L, D = x.shape
        selected, gate, aux = self.depth_router(x, selection)
        idx, valid, counts = gather_selected(selected)  # [B, K] positions in time order, padded
        K = idx.shape[1]
        if K == 0:  # no token of any sequence enters this block
            return BlockOutput(x, None, selected, aux)
        take = idx[..., None].expand(B, K, D)
        xs = x.gather(1, take)  # [B, K, D]
        a = self.self_attn.forward_subset(self.input_layernorm(xs), cos[idx], sin[idx], valid, cache, self.layer)
        h = self.post_attention_layernorm(xs + a)
        # The routers see the selected tokens only: their ids and rows in the [B*L] batch (for traces); no
        # previous layer's routing (it covers other tokens).
        ids = context.token_ids.view(B, L) if context.token_ids is not None else None
        flat_index = torch.arange(B, device=x.device)[:, None] * L + idx  # [B, K]: row in the [B*L] batch
        if bool(valid.all()):  # top-k selection: the same count in every sequence, a [B, K] batch
            sub = replace(
                context, seq_len=K, previous=None, token_index=flat_index.reshape(-1),
                token_ids=ids.gather(1, idx).reshape(-1) if ids is not None else None,
            )
            y, routing = self._ffn(h, sub, cache)
        else:  # the valid tokens only, flattened to [N, D]
            sub = replace(
                context, seq_len=None, previous=None, token_index=flat_index[valid],
                token_ids=ids.gather(1, idx)[valid] if ids is not None else None,
            )
            y_valid, routing = self._ffn(h[valid], sub, cache)
            y = h.new_zeros(B, K, D)
            y[valid] = y_valid
        g = gate.gather(1, idx) * valid  # [B, K]; padding rows add nothing
        update = (a + y) * g[..., None].to(x.dtype)
        return BlockOutput(x.scatter_add(1, take, update), routing, selected, aux)


@dataclass
class BlockOutput:
    """What a block returns: the new hidden states, its MoE routing, and its mixture-of-depths decisions."""

    x: Tensor  # [B, L, D]
    routing: Routing | None = None  # None for dense blocks (and MoD blocks that processed no token)
    selected: Tensor | None = None  # [B, L] bool: tokens a mixture-of-depths block processed (None: all)
    depth_aux: Tensor | None = None  # the mixture-of-depths causal-decision loss (training selection only)


@dataclass
class LMOutput:
    """What the LM returns."""

    logits: Tensor  # [B, L, vocab]
    loss: Tensor | None = None  # mean next-token cross-entropy (when targets were given)
    aux_loss: Tensor | None = None  # sum of every MoE layer's auxiliary losses (None for dense models)
    routings: list[Routing | None] = field(default_factory=list)  # per block; None for dense blocks
    # per block: [B, L] bool of the tokens a mixture-of-depths block processed; None for ordinary blocks
    depth: list[Tensor | None] = field(default_factory=list)


FFN_PARTS = (".mlp.experts.", ".mlp.shared_experts.", ".mlp.gate_proj.", ".mlp.up_proj.", ".mlp.down_proj.")


def init_multiplier(cfg: LMConfig, name: str) -> float:
    """The init std multiplier of parameter `name` of an MoELM: `embed_init_mult` for the embedding and
    output head, `attn_init_mult` for attention projections, `ffn_init_mult` for feed-forward weights
    (dense MLP, routed and shared experts; not routers or gates), else 1."""
    if name.startswith(("embed_tokens.", "lm_head.")):
        return cfg.embed_init_mult
    if ".self_attn." in name:
        return cfg.attn_init_mult
    if any(part in name for part in FFN_PARTS):
        return cfg.ffn_init_mult
    return 1.0


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
        """Normal(0, init_std) for linears and embeddings; output projections scaled by 1/sqrt(2 n_layers);
        each std times the parameter's `init_multiplier`."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones
            s = (
                std / math.sqrt(2 * self.config.n_layers)
                if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                else std
            )
            mult = init_multiplier(self.config, name)
            nn.init.normal_(p, std=s * mult if mult != 1 else s)

    def forward(
        self,
        input_ids: Tensor,
        *,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        depth_selection: str | None = None,
    ) -> LMOutput:
        """input_ids: [B, L] -> LMOutput (logits [B, L, V]; loss when targets [B, L] are given,
        ignoring target -100). With a cache, the ids continue the cached sequence.

        depth_selection (mixture-of-depths models): "topk" (each routed block takes the top
        capacity x L tokens of each sequence; not causal) or "causal" (per-token decisions, what
        generation uses); default "topk" in training mode without a cache, else "causal"."""
        if input_ids.dim() != 2:
            raise ValueError(f"MoELM: expected input_ids [B, L], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + L > self.config.max_seq_len:
            raise ValueError(f"MoELM: sequence of {start + L} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0:
            raise ValueError(f"MoELM: token ids must be in [0, {self.config.vocab_size})")
        if depth_selection is None:
            depth_selection = "topk" if self.training and cache is None else "causal"
        if depth_selection not in ("topk", "causal"):
            raise ValueError(f"MoELM: depth_selection must be 'topk' or 'causal', got {depth_selection!r}")
        if depth_selection == "topk" and cache is not None and self.config.mod_capacity < 1:
            raise ValueError("MoELM: top-k depth selection is not causal; a KV-cached forward needs 'causal'")
        cos, sin = self.rope_cos[start : start + L], self.rope_sin[start : start + L]
        x = self.embed_tokens(input_ids)  # [B, L, D]
        context = RoutingContext(seq_len=L, token_ids=input_ids.reshape(-1))  # one per forward, shared by the layers
        routings: list[Routing | None] = []
        depth: list[Tensor | None] = []
        aux = []
        for block in self.layers:
            o = block(x, cos, sin, cache, context, depth_selection)
            x = o.x
            routings.append(o.routing)
            depth.append(o.selected)
            if o.depth_aux is not None:
                aux.append(o.depth_aux)
            if o.routing is not None and o.routing.state is not None:  # a recurrent router's state, for the next
                context = replace(context, previous=o.routing)
        if cache is not None:
            cache.length += L
        logits = self.lm_head(self.norm(x))  # [B, L, V]
        aux += [r.total_aux() for r in routings if r is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return LMOutput(logits=logits, loss=loss, aux_loss=aux_loss, routings=routings, depth=depth)

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
