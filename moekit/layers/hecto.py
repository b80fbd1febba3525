"""Hecto heterogeneous experts: a GRU expert (sequential reasoning) and a feed-forward expert (static abstraction).

Pandey et al. 2025, "Hecto: Modular Sparse Experts for Adaptive and Interpretable Reasoning" (arXiv
2506.22919). Hecto's experts have different architectures: a GRU expert for temporal/sequential
reasoning and an FFN expert for static abstraction, under sparse top-1 gating (the paper uses a
temperature-scaled softmax with entropy and load-balancing regularisation). Each expert only receives
the inputs routed to it ("isolated input representations").

moekit applies this at token level inside an LM's MoE layer. `HectoExperts` holds the two experts:

    id 0, FFN:  y = W_down (act(W_gate x) * (W_up x))                 (`ffn_gate_up [2F, D]`, `ffn_down [D, F]`)
    id 1, GRU:  h_j = GRU(x_{t_j}, h_{j-1});  y_{t_j} = W_out h_j      (`gru` with hidden H, `gru_out [D, H]`)

where t_1 < t_2 < ... are the positions of one sequence routed to the GRU: its hidden state advances
only on its own tokens (sparse compute; causal, since y at t depends on routed tokens at <= t only).
A token's output is sum over its routing slots of weight * expert output (k=2 may give it both).

The GRU needs to know where sequences start, so its `forward` takes the keywords `seq_len` (rows are
B sequences of seq_len consecutive tokens) and, for KV-cached generation, `cache` and `layer` (the
LM's `KVCache` and block index) and `iteration` (of a Chain-of-Experts layer); `MoE` passes the
keywords an experts module names in its signature. The GRU state is carried in
`cache.states[(layer, "hecto_gru")]` ([B, H]; `"hecto_gru.{t}"` for iteration t > 0), so prefill +
token-by-token decoding equals one full forward. The stored state keeps its
autograd graph, like the cache's keys and values. Route with any router, typically `topk` with k=1:
`LMConfig(experts="hecto", num_experts=2, router="topk", router_args={"k": 1})`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.layers.film import check_experts_input
from moekit.routing.routing import Routing
from moekit.utils.checks import check_positive_ints, is_positive_int

# key name in `KVCache.states`: (layer, STATE_NAME) -> [B, H]; iteration t > 0 of a chain: f"{STATE_NAME}.{t}"
STATE_NAME = "hecto_gru"


class HectoExperts(nn.Module):
    """Two experts of different kinds: 0 = gated FFN of width F, 1 = GRU of hidden H plus an output projection.

    Args:
        num_experts: must be 2 (kept for the common experts signature).
        dim: model width D.
        hidden: width F of the FFN expert.
        activation: "silu" | "gelu" | "gelu_tanh" | "relu" (FFN expert).
        gru_hidden: hidden size H of the GRU expert (None: D).

    Parameters: `ffn_gate_up [2F, D]`, `ffn_down [D, F]`, `gru` (`nn.GRU`, one layer, `weight_ih_l0 [3H, D]`,
    `weight_hh_l0 [3H, H]`, `bias_ih_l0 [3H]`, `bias_hh_l0 [3H]`, gates in PyTorch's r, z, n order),
    `gru_out [D, H]`.
    """

    needs_full_sequence = True  # the GRU steps through each sequence (`seq_len` rows) in order

    def __init__(
        self, *, num_experts: int = 2, dim: int, hidden: int, activation: str = "silu", gru_hidden: int | None = None
    ) -> None:
        super().__init__()
        if num_experts != 2:
            raise ValueError(f"HectoExperts: num_experts must be 2 (0 = FFN, 1 = GRU), got {num_experts!r}")
        check_positive_ints("HectoExperts: ", dim=dim, hidden=hidden)
        if gru_hidden is not None and not is_positive_int(gru_hidden):
            raise ValueError(f"HectoExperts: gru_hidden must be None or a positive integer, got {gru_hidden!r}")
        self.num_experts, self.dim, self.hidden, self.activation = 2, dim, hidden, activation
        self.gru_hidden = gru_hidden
        H = self.gru_width
        self.act = get_activation(activation)
        self.ffn_gate_up = nn.Parameter(torch.randn(2 * hidden, dim) / math.sqrt(dim))
        self.ffn_down = nn.Parameter(torch.randn(dim, hidden) / math.sqrt(hidden))
        self.gru = nn.GRU(dim, H, num_layers=1, batch_first=True)
        self.gru_out = nn.Parameter(torch.randn(dim, H) / math.sqrt(H))

    @property
    def gru_width(self) -> int:
        """Hidden size H of the GRU expert."""
        return self.gru_hidden or self.dim

    def ffn(self, x: Tensor) -> Tensor:
        """The FFN expert on x [n, D] -> [n, D]."""
        gate, up = (x @ self.ffn_gate_up.t()).chunk(2, dim=-1)  # [n, F] each
        return (self.act(gate) * up) @ self.ffn_down.t()

    def forward(
        self,
        x: Tensor,
        routing: Routing,
        *,
        seq_len: int | None = None,
        cache: Any = None,
        layer: int | None = None,
        iteration: int = 0,
    ) -> Tensor:
        """x: [T, D], routing [T, k] over {0: FFN, 1: GRU} (-1: empty) -> [T, D].

        Rows are T // seq_len sequences of seq_len consecutive tokens (None: one sequence of T).
        With `cache` (anything with a `states` dict, e.g. `KVCache`) and `layer`, the GRU starts from
        `cache.states[(layer, "hecto_gru")]` [B, H] (zeros if absent) and stores its state after each
        sequence's last routed token there (unchanged for a sequence with none routed in this call);
        iteration t > 0 of a Chain-of-Experts layer keeps its own state, under "hecto_gru.{t}".
        """
        check_experts_input(self, x, routing)
        T = x.shape[0]
        if seq_len is not None and not is_positive_int(seq_len):
            raise ValueError(f"HectoExperts: seq_len must be None or a positive integer, got {seq_len!r}")
        L = T if seq_len is None else seq_len
        if T % max(L, 1):  # T = 0 with seq_len None: L = 0
            raise ValueError(f"HectoExperts: {T} tokens are not a whole number of sequences of seq_len={L}")
        if cache is not None and layer is None:
            raise ValueError("HectoExperts: a cache needs the block index `layer` to key the GRU state")
        out = torch.zeros_like(x)
        if T == 0:
            return out
        B = T // L
        ids, w = routing.expert_ids, routing.weights.to(x.dtype)  # [T, k]
        # Per expert, one output per token; a token in several slots of one expert gets their summed weight.
        m0, m1 = ids == 0, ids == 1  # [T, k]
        w0, w1 = (w * m0).sum(dim=1), (w * m1).sum(dim=1)  # [T]
        tok0 = torch.where(m0.any(dim=1))[0]
        if tok0.numel():
            out = out.index_add(0, tok0, (self.ffn(x[tok0]) * w0[tok0].unsqueeze(-1)).to(out.dtype))

        key = (layer, STATE_NAME if iteration == 0 else f"{STATE_NAME}.{iteration}")
        h0 = self._initial_state(cache, key, B, x) if cache is not None else None
        mask = m1.any(dim=1).view(B, L)  # [B, L]: tokens routed to the GRU
        counts = mask.sum(dim=1)  # [B]
        Kmax = int(counts.max())
        if Kmax == 0:
            return out  # no GRU token: the cached state (if any) stays as it was
        b_idx, t_idx = mask.nonzero(as_tuple=True)  # [n1] each, time order within each sequence
        rank = (mask.cumsum(dim=1) - 1)[b_idx, t_idx]  # [n1]: position in the sequence's routed subsequence
        tok1 = b_idx * L + t_idx  # [n1] flat token index
        padded = x.new_zeros(B, Kmax, self.dim).index_put((b_idx, rank), x[tok1])  # [B, Kmax, D], padding at the end
        hs, _ = self.gru(padded, None if h0 is None else h0.unsqueeze(0).contiguous())  # [B, Kmax, H]
        y1 = hs[b_idx, rank] @ self.gru_out.t()  # [n1, H] x [H, D] -> [n1, D]
        out = out.index_add(0, tok1, (y1 * w1[tok1].unsqueeze(-1)).to(out.dtype))
        if cache is not None:
            last = hs[torch.arange(B, device=x.device), (counts - 1).clamp_min(0)]  # [B, H]
            cache.states[key] = torch.where((counts > 0).unsqueeze(-1), last, h0)
        return out

    def _initial_state(self, cache: Any, key: tuple, B: int, x: Tensor) -> Tensor:
        """The cached GRU state [B, H] under `key`, or zeros."""
        h0 = cache.states.get(key)
        H = self.gru_width
        if h0 is None:
            return x.new_zeros(B, H)
        if tuple(h0.shape) != (B, H):
            raise ValueError(f"HectoExperts: cached GRU state {key} is {tuple(h0.shape)}, expected [{B}, {H}]")
        return h0

    def config(self) -> dict[str, Any]:
        return {
            "num_experts": 2,
            "dim": self.dim,
            "hidden": self.hidden,
            "activation": self.activation,
            "gru_hidden": self.gru_hidden,
        }

    def flops_per_token(self, load: Tensor, tokens: int) -> float:
        """Forward FLOPs per token of these routed experts, given `load [E]`: the token-slots each expert
        processed over `tokens` tokens (what the leaderboard counts as active expert compute).

        A slot of the FFN expert costs 2 * 3 * D * F; one of the GRU expert (hidden H) 2 * (3 (D H + H H) + H D):
        three gates' input and recurrent matmuls, then the output projection."""
        D, H = self.dim, self.gru_width
        return float((2 * 3 * D * self.hidden * load[0] + 2 * (3 * (D * H + H * H) + H * D) * load[1]) / tokens)
