"""DeepSeek routing: group-limited top-k with auxiliary-loss-free load balancing.

Dai et al. 2024, "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language
Models" (fine-grained experts, softmax scores, expert-level balance loss); DeepSeek-AI 2024,
"DeepSeek-V2" (device/group-limited routing, softmax scores, group score = the group's max score);
DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (sigmoid scores s_i = sigmoid(u^T e_i), node-limited
routing with a group's score = the sum of its top-2 scores, top-k of s_i + b_i for selection only,
gate g_i = s_i / sum_{j in top-k} s_j times the routed scaling factor; auxiliary-loss-free balancing
b_i += gamma * sign(mean load - load_i) after each step; a small sequence-wise balance loss, eq. 17-20).

The computation equals Hugging Face transformers' `DeepseekV3TopkRouter` (logits in float32,
masked groups at -inf, +1e-20 in the normaliser) on the same `weight [E, D]` and
`e_score_correction_bias [E]`, the HF names, so the tensors can be shared.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import (
    Router,
    check_choice,
    check_input,
    check_logits,
    check_positive,
    seq_len_of,
)
from moekit.routing.losses import balance_losses
from moekit.routing.registry import register_router
from moekit.routing.routing import Routing, RoutingContext

SCORINGS = ("sigmoid", "softmax")
GROUP_SCORES = ("top2_sum", "max")


@register_router("deepseek")
class DeepSeekRouter(Router):
    """Group-limited top-k over sigmoid (V3) or softmax (V2) scores with a selection-only bias.

    Args:
        dim: model width D.
        num_experts: E (routed experts; shared experts live in the MoE layer).
        k: experts per token (V3: 8).
        scoring: "sigmoid" (V3) or "softmax" (DeepSeekMoE, V2).
        n_group: experts are split into n_group consecutive groups of E / n_group (V3: 8).
        topk_group: a token may only use experts of its topk_group best groups (V3: 4).
        group_score: a group's score: "top2_sum" (V3: sum of its two best bias-corrected scores) or
            "max" (V2 `group_limited_greedy`: its best score).
        norm_topk_prob: divide the k chosen scores by their sum (V3: True; V2: False).
        routed_scaling_factor: multiplies the final weights (V3: 2.5).
        bias_update_rate: gamma of the auxiliary-loss-free balancing (V3: 1e-3); 0 disables. In
            training mode only, after routing, under no_grad: b_i += gamma * sign(mean_i load - load_i),
            loads counted over this call's tokens. Under data parallelism the loads are per rank.
        load_balance: coefficient of the Switch/DeepSeekMoE expert-level balance loss.
        seq_balance: coefficient of the V3 sequence-wise balance loss (V3: 1e-4); needs the sequence
            length (`RoutingContext.seq_len`, set by the MoE layer for [B, L, D] input).
        z_loss: coefficient of the ST-MoE router z-loss.

    The losses use probabilities p = s / sum_j s_j (identical to s for softmax scoring).
    Buffer `e_score_correction_bias [E]` (float32 even when the module is cast to bf16, as in HF) is
    saved in checkpoints; it shifts selection only, never the weights. `meta["scores"]` holds the
    scores s [T, E] (float32).
    """

    token_local = True

    expert_dims = {"weight": 0, "e_score_correction_bias": 0}  # per-expert rows (moekit.layers.surgery)

    def expert_args(self, sources: list[list[int]], requested: dict) -> dict:
        """Expert-set surgery: keep the n_group groups only if every new expert comes from the old group
        of its new position (e.g. the same number kept in each group); else ask for new groups."""
        G = self.n_group
        if G == 1 or "n_group" in requested:
            return {}
        E_new, size = len(sources), self.num_experts // G
        if E_new % G == 0 and all(
            src and all(s // size == j // (E_new // G) for s in src) for j, src in enumerate(sources)
        ):
            return {}
        raise ValueError(
            f"{type(self).__name__}: the new expert set does not keep the {G} groups of {size} consecutive "
            f"experts (new experts from old ids {sources}); pass router_args={{'n_group': ..., 'topk_group': ...}}"
        )

    def regroup(self, sources: list[list[int]], *, force: bool = False) -> dict:
        """Expert pruning: router arguments that keep the groups valid for the new expert set `sources`
        without the caller choosing them. {} when the old groups are kept (`expert_args` accepts the set)
        with at least 2 experts per group under "top2_sum" (transformers takes a top-2 in every group)
        and not `force`; else new groups of consecutive new experts: n_group' the largest divisor of
        E' = len(sources) not above n_group leaving groups of >= 2 (1 for "max"), and
        topk_group' = ceil(topk_group * n_group' / n_group) (the same share of groups), raised until
        the k experts fit in the kept groups."""
        E_new, G = len(sources), self.n_group
        least = 2 if self.group_score == "top2_sum" else 1
        if G == 1:
            return {}
        if not force and E_new % G == 0 and E_new // G >= least:
            try:
                self.expert_args(sources, {})
                return {}
            except ValueError:
                pass
        n = max([g for g in range(1, G + 1) if E_new % g == 0 and E_new // g >= least] or [1])
        topk = min(n, -(-self.topk_group * n // G))
        while topk < n and topk * (E_new // n) < self.k:
            topk += 1
        return {"n_group": n, "topk_group": topk}

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int = 2,
        scoring: str = "sigmoid",
        n_group: int = 1,
        topk_group: int = 1,
        group_score: str = "top2_sum",
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
        bias_update_rate: float = 1e-3,
        load_balance: float = 0.0,
        seq_balance: float = 0.0,
        z_loss: float = 0.0,
    ) -> None:
        super().__init__(
            dim=dim, num_experts=num_experts, k=k, gate_outputs=num_experts,
            losses=dict(load_balance=load_balance, seq_balance=seq_balance, z_loss=z_loss),
            selection_bias=True, bias_update_rate=bias_update_rate,
        )
        who = self.who
        check_choice(scoring, SCORINGS, "scoring", who)
        check_choice(group_score, GROUP_SCORES, "group_score", who)
        if not isinstance(n_group, int) or n_group < 1 or num_experts % n_group:
            raise ValueError(
                f"{who}: n_group must be a positive integer dividing num_experts={num_experts}, "
                f"got {n_group!r}"
            )
        if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(
                f"{who}: topk_group must be an integer in [1, n_group={n_group}], got {topk_group!r}"
            )
        if k > topk_group * (num_experts // n_group):
            raise ValueError(
                f"{who}: k={k} exceeds the experts of the kept groups, topk_group * num_experts / n_group "
                f"= {topk_group * (num_experts // n_group)}"
            )
        check_positive(who, routed_scaling_factor=routed_scaling_factor)
        self.scoring = scoring
        self.n_group = n_group
        self.topk_group = topk_group
        self.group_score = group_score
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def select(self, scores: Tensor) -> Tensor:
        """scores s [T, E] (float32) -> chosen expert ids [T, k] by group-limited top-k of s + b."""
        T, E = scores.shape
        G = self.n_group
        choice = scores + self.e_score_correction_bias.float()  # [T, E], for selection only
        if G > 1 and self.topk_group < G:
            grouped = choice.view(T, G, E // G)  # [T, G, E/G]
            if self.group_score == "top2_sum":
                group = grouped.topk(min(2, E // G), dim=-1).values.sum(dim=-1)  # [T, G]
            else:
                group = grouped.amax(dim=-1)  # [T, G]
            keep = torch.topk(group, self.topk_group, dim=-1).indices  # [T, topk_group]
            group_mask = torch.zeros_like(group, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
            expert_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        # sorted=False as transformers: the same slot order, so the normaliser adds the same way
        return torch.topk(choice, self.k, dim=-1, sorted=False).indices  # [T, k]

    def forward(self, x: Tensor, *, context: RoutingContext | None = None) -> Routing:
        """x: [T, D] -> Routing with expert_ids/weights [T, k], logits [T, E] (float32)."""
        who = self.who
        check_input(x, self.dim, who)
        logits = torch.nn.functional.linear(x.float(), self.weight.float())  # [T, E], float32 as V3
        check_logits(logits, who)
        if self.scoring == "sigmoid":
            scores = torch.sigmoid(logits)  # [T, E]
        else:
            scores = torch.softmax(logits, dim=-1)
        ids = self.select(scores)  # [T, k]
        weights = scores.gather(1, ids)  # [T, k], original scores: the bias never enters
        if self.norm_topk_prob:
            # + 1e-20 rather than `renormalize`: transformers' DeepseekV3TopkRouter adds it (bit parity)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        aux: dict[str, Tensor] = {}
        if self.load_balance or self.seq_balance or self.z_loss:
            probs = scores if self.scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
            aux = balance_losses(
                probs, logits, ids,
                load_balance=self.load_balance, seq_balance=self.seq_balance, z=self.z_loss,
                seq_len=seq_len_of(context),
            )
        self.maybe_update_bias(ids)
        return Routing(ids, weights.to(x.dtype), logits, self.num_experts, aux=aux, meta={"scores": scores})
