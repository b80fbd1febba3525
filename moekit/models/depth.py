"""Mixture-of-Depths: a router per block lets each token skip the whole block (attention and feed-forward).

Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating compute in transformer-based language
models" (MoD). In a routed block a linear router scores every token, r_i = w^T x_i, and only the top-k
tokens of each sequence (k = capacity x sequence length, fixed in advance, so the compute graph has
static shapes) pass through the block; the others go around it on the residual stream:

    x_i' = x_i + g(r_i) f_i(X~)    if r_i is among the top-k of its sequence
    x_i' = x_i                     otherwise

where f is the block's attention + feed-forward update computed over the selected tokens X~ only
(attention among the selected tokens, causally) and g(r) multiplies the update by the router score, so
the router learns from the language-model loss. The paper uses g(r) = r ("linear"); moekit defaults to
g(r) = sigmoid(r), which starts at 1/2 instead of ~0 for a fresh router (with a small-normal init a
linear gate silences the routed blocks early in training); `LMConfig.mod_gate` picks.

Top-k over a sequence is not causal (whether token i is selected depends on later tokens), so at
sampling time the decision is made per token from a causal predictor. The paper gives two, both here
(`LMConfig.mod_causal`):

- "aux_loss": a binary cross-entropy loss trains the router's own logit r_i to predict whether token i
  was in the top-k; at inference a token is processed when sigmoid(r_i) > 1/2;
- "predictor": a small MLP on the (gradient-stopped) block input predicts the same target; the router
  itself gets no auxiliary gradient.

`MoELM` uses top-k selection in training and the causal decisions otherwise (evaluation and KV-cached
generation), so a validation loss measures the model that generates. A routed block's KV cache holds
only the tokens it processed: each sequence has its own number of cached keys per routed block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MOD_GATES = ("sigmoid", "linear")
MOD_CAUSAL = ("aux_loss", "predictor")


class DepthRouter(nn.Module):
    """The router of one mixture-of-depths block: a score per token, the selection, the causal decision.

    Args:
        dim: model width D.
        capacity: fraction of each sequence's tokens the block processes in training (0 < capacity <= 1).
        gate: "sigmoid" | "linear" (how the score scales the block's update).
        causal: "aux_loss" | "predictor" (what decides per token at inference).
        aux_weight: weight of the binary cross-entropy loss of the causal decision.

    Parameters: `weight [1, D]` (the router, w), and with causal="predictor" `predictor` (D -> D/4 -> 1 MLP).
    """

    def __init__(
        self, *, dim: int, capacity: float, gate: str = "sigmoid", causal: str = "aux_loss", aux_weight: float = 0.01
    ) -> None:
        super().__init__()
        if not 0 < capacity <= 1:
            raise ValueError(f"DepthRouter: capacity must be in (0, 1], got {capacity!r}")
        if gate not in MOD_GATES:
            raise ValueError(f"DepthRouter: gate must be one of {list(MOD_GATES)}, got {gate!r}")
        if causal not in MOD_CAUSAL:
            raise ValueError(f"DepthRouter: causal must be one of {list(MOD_CAUSAL)}, got {causal!r}")
        self.dim, self.capacity, self.gate, self.causal, self.aux_weight = dim, capacity, gate, causal, aux_weight
        self.weight = nn.Parameter(torch.empty(1, dim))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))
        self.predictor = None
        if causal == "predictor":
            h = max(8, dim // 4)
            self.predictor = nn.Sequential(nn.Linear(dim, h, bias=False), nn.SiLU(), nn.Linear(h, 1, bias=False))

    def capacity_tokens(self, seq_len: int) -> int:
        """Tokens per sequence the block processes under top-k selection: ceil(capacity x L), at least 1."""
        return min(seq_len, max(1, math.ceil(self.capacity * seq_len - 1e-9)))

    def forward(self, x: Tensor, selection: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """x: [B, L, D] (the block input) -> (selected [B, L] bool, gate [B, L], aux loss or None).

        selection "topk": the top ceil(capacity L) scores of each sequence (training; the aux loss trains the
        causal decision to reproduce it); "causal": each token on its own (sigmoid of the router's logit, or
        of the predictor's, > 1/2)."""
        r = (x @ self.weight.t()).squeeze(-1).float()  # [B, L]
        gate = torch.sigmoid(r) if self.gate == "sigmoid" else r
        causal_logit = r if self.predictor is None else self.predictor(x.detach()).squeeze(-1).float()
        if selection == "causal":
            return causal_logit > 0, gate, None
        if selection != "topk":
            raise ValueError(f"DepthRouter: selection must be 'topk' or 'causal', got {selection!r}")
        k = self.capacity_tokens(x.shape[1])
        idx = r.topk(k, dim=1).indices
        selected = torch.zeros_like(r, dtype=torch.bool).scatter_(1, idx, True)
        aux = self.aux_weight * F.binary_cross_entropy_with_logits(causal_logit, selected.float())
        return selected, gate, aux


def gather_selected(selected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """selected [B, L] bool -> (idx [B, K], valid [B, K], counts [B]): the positions of each sequence's selected
    tokens in time order, padded at the end (with unselected positions) to K = the largest count."""
    B, L = selected.shape
    counts = selected.sum(dim=1)
    K = int(counts.max()) if B else 0
    ar = torch.arange(L, device=selected.device)
    order = torch.where(selected, ar, ar + L).argsort(dim=1)  # selected first, each group in time order
    idx = order[:, :K]
    valid = torch.arange(K, device=selected.device)[None, :] < counts[:, None]
    return idx, valid, counts
