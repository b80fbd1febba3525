"""MixLoRA: one top-k router per FFN block over experts that are the frozen FFN with LoRA on gate/up/down.

Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts"
(arXiv:2404.15159): 8 experts, top-2 routing (softmax over the experts, the top-2 renormalised), the Switch
load-balance loss (coefficient 0.01), and independent plain LoRA adapters on the attention projections
(q/k/v/o). The block computation is `moekit.adapt.ffn.LoRAFFNExperts`; the per-projection variant is
"mixlora-proj".
"""

from __future__ import annotations

from moekit.adapt.config import AdaptConfig
from moekit.adapt.methods import ATTN, register_method


@register_method("mixlora")
def mixlora(*, targets: list[str] | None = None, num_experts: int = 8, k: int = 2, rank: int = 8,
            alpha: float | None = None, load_balance: float = 0.01, attention: bool = True) -> AdaptConfig:
    """MixLoRA (Li et al. 2024): top-k expert FFNs (LoRA on gate/up/down) per block, load balance, attention LoRA."""
    return AdaptConfig(
        method="mixlora", targets=list(targets or ["mlp"]), kind="ffn", num_experts=num_experts, rank=rank,
        alpha=2.0 * rank if alpha is None else alpha, router="topk",
        router_args=dict(k=k, normalize=True, load_balance=load_balance),
        lora_targets=list(ATTN) if attention else [],
    )
