"""The Hugging Face MoE families moekit patches, one declarative entry each.

An entry says where a family's sparse MoE block lives (its class name), which of its attributes
hold the gate, the fused experts and the shared expert, and which moekit router with which
arguments reproduces its routing. `patch`, `unpatch`, `save` and `export` read only this table;
nothing in them names a family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

# Router arguments that change only training losses, never the forward output: free to differ
# from the family's own routing when saving (transformers ignores them).
LOSS_ARGS = frozenset({"load_balance", "seq_balance", "z_loss", "bias_update_rate", "dynamic_loss"})

# transformers `hidden_act` -> moekit activation name (moekit.layers.activations).
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class Family:
    """How one transformers MoE family is laid out and routes."""

    name: str  # moekit's name for the family (the text model's `model_type`)
    model_types: tuple[str, ...]  # `config.model_type` values the entry covers
    block: str  # class name of the sparse MoE block that `patch` replaces
    router: str  # registered moekit router that reproduces the family's routing
    router_args: Callable[[Any], dict[str, Any]]  # HF config -> router keyword arguments (k included)
    num_experts_key: str  # HF config field that holds E
    # router argument -> HF config field that holds it (written back by `save`, read by `export`)
    config_keys: dict[str, str] = field(default_factory=lambda: {"k": "num_experts_per_tok"})
    gate: str = "gate"  # block attribute of the router module (its `weight [E, D]` is shared)
    gate_tensors: tuple[str, ...] = ("weight",)  # router tensors shared with the HF gate, by name
    unsaved_buffers: tuple[str, ...] = ()  # router buffers transformers does not have (kept out of state_dict)
    experts: str = "experts"  # block attribute of the fused experts (`gate_up_proj`, `down_proj`)
    shared: str | None = None  # block attribute of the always-on shared expert MLP, if any
    shared_gate: str | None = None  # block attribute of the shared expert's sigmoid gate [1, D], if any
    # HF config -> (moekit activation name, its arguments) of the routed experts; None: from `hidden_act`
    expert_activation: Callable[[Any], tuple[str, dict[str, Any]]] | None = None
    # In 16-bit models the family's router returns float32 routing weights (not cast back to the
    # model's dtype): the experts' outputs are scaled in float32, then rounded.
    float32_weights: bool = False
    # The router logits transformers records (`output_router_logits=True`) are float32 in 16-bit models.
    float32_logits: bool = False
    notes: str = ""  # what differs from transformers, if anything (shown in docs/hf.md)


def _topk(normalize: Callable[[Any], bool], order: str = "softmax_topk") -> Callable[[Any], dict[str, Any]]:
    """Softmax over all experts then top-k, optionally renormalised (or top-k logits then softmax:
    order="topk_softmax"); the load-balance coefficient comes from the config."""

    def args(cfg: Any) -> dict[str, Any]:
        jitter = float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0)
        return {
            "k": cfg.num_experts_per_tok,
            "order": order,
            "normalize": bool(normalize(cfg)),
            "noise": "jitter" if jitter > 0 else "none",
            "noise_eps": jitter if jitter > 0 else 1e-2,
            "load_balance": float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0),
            "routed_scale": 1.0,  # transformers' top-k families have no routed scaling
            "selection_bias": False,  # nor a selection bias
        }

    return args


def _deepseek(cfg: Any) -> dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5: sigmoid scores, group-limited top-k on s + b (b selects only)."""
    return {
        "k": cfg.num_experts_per_tok,
        "scoring": "sigmoid",
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "group_score": "top2_sum",
        "norm_topk_prob": bool(cfg.norm_topk_prob),
        "routed_scaling_factor": float(cfg.routed_scaling_factor),
        "bias_update_rate": 0.0,  # transformers never updates the bias in forward
    }


def _deepseek_v2(cfg: Any) -> dict[str, Any]:
    """DeepSeek-V2: softmax scores, greedy or group-limited top-k (group score = its max), weights
    not renormalised, times the routed scaling factor; no selection bias."""
    grouped = cfg.topk_method == "group_limited_greedy"
    return {
        "k": cfg.num_experts_per_tok,
        "scoring": "softmax",
        "n_group": cfg.n_group if grouped else 1,
        "topk_group": cfg.topk_group if grouped else 1,
        "group_score": "max",
        "norm_topk_prob": False,
        "routed_scaling_factor": float(cfg.routed_scaling_factor),
        "bias_update_rate": 0.0,
    }


def _sparsemixer(cfg: Any) -> dict[str, Any]:
    """PhiMoE: SparseMixer, always 2 experts whatever `num_experts_per_tok` says, threshold
    `router_jitter_noise`."""
    return {
        "k": 2,
        "jitter_eps": float(cfg.router_jitter_noise),
        "load_balance": float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0),
    }


def _hy_v4_activation(cfg: Any) -> tuple[str, dict[str, Any]]:
    """HY-V4's experts: SiLU whatever `hidden_act` says, gate and up clamped at `swiglu_limit`."""
    limit = getattr(cfg, "swiglu_limit", None)
    return ("clamped_swiglu", {"limit": float(limit)}) if limit else ("silu", {})


_DEEPSEEK_KEYS = {
    "k": "num_experts_per_tok",
    "n_group": "n_group",
    "topk_group": "topk_group",
    "norm_topk_prob": "norm_topk_prob",
    "routed_scaling_factor": "routed_scaling_factor",
}
_QWEN_KEYS = {"k": "num_experts_per_tok", "normalize": "norm_topk_prob"}

MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    block="MixtralSparseMoeBlock",
    router="topk",
    router_args=_topk(lambda cfg: True),
    num_experts_key="num_local_experts",
    float32_weights=True,
    notes="router jitter (training only, off by default) multiplies only the router's input, not also the "
    "experts' input as transformers does",
)
OLMOE = Family(
    name="olmoe",
    model_types=("olmoe",),
    block="OlmoeSparseMoeBlock",
    router="topk",
    router_args=_topk(lambda cfg: cfg.norm_topk_prob),
    num_experts_key="num_experts",
    config_keys=_QWEN_KEYS,
)
QWEN2_MOE = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    block="Qwen2MoeSparseMoeBlock",
    router="topk",
    router_args=_topk(lambda cfg: cfg.norm_topk_prob),
    num_experts_key="num_experts",
    config_keys=_QWEN_KEYS,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
)
DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    block="DeepseekV3MoE",
    router="deepseek",
    router_args=_deepseek,
    num_experts_key="n_routed_experts",
    config_keys=_DEEPSEEK_KEYS,
    gate_tensors=("weight", "e_score_correction_bias"),
    shared="shared_experts",
    float32_weights=True,
    float32_logits=True,
)

GRANITEMOE = Family(
    name="granitemoe",
    model_types=("granitemoe",),
    block="GraniteMoeMoE",
    router="topk",
    router_args=_topk(lambda cfg: True, order="topk_softmax"),  # top-k logits, softmax over them
    num_experts_key="num_local_experts",
    gate="router",
    float32_logits=True,
)


def _like(base: Family, name: str, block: str, **changes: Any) -> Family:
    """A family whose block computes exactly as `base`'s under other class names."""
    return replace(base, **{"name": name, "model_types": (name,), "block": block, **changes})


FAMILIES: tuple[Family, ...] = (
    MIXTRAL,
    OLMOE,
    QWEN2_MOE,
    _like(OLMOE, "qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    DEEPSEEK_V3,
    Family(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        block="DeepseekV2Moe",
        router="deepseek",
        router_args=_deepseek_v2,
        num_experts_key="n_routed_experts",
        config_keys={"k": "num_experts_per_tok", "routed_scaling_factor": "routed_scaling_factor"},
        unsaved_buffers=("e_score_correction_bias",),  # V2 has no selection bias: moekit's stays 0
        shared="shared_experts",
        float32_weights=True,
        float32_logits=True,
    ),
    Family(
        name="jamba",
        model_types=("jamba",),
        block="JambaSparseMoeBlock",
        router="topk",
        router_args=_topk(lambda cfg: False),  # softmax, top-k, never renormalised
        num_experts_key="num_experts",
        gate="router",
    ),
    GRANITEMOE,
    # Blocks that compute exactly as one of the above, under other class names.
    _like(MIXTRAL, "minimax", "MiniMaxSparseMoeBlock", notes=MIXTRAL.notes),
    _like(OLMOE, "flex_olmo", "FlexOlmoSparseMoeBlock"),
    _like(OLMOE, "mellum", "MellumSparseMoeBlock"),
    _like(QWEN2_MOE, "qwen3_next", "Qwen3NextSparseMoeBlock"),
    _like(GRANITEMOE, "granitemoeshared", "GraniteMoeSharedMoE"),  # its shared MLP sits outside the block
    _like(GRANITEMOE, "granitemoehybrid", "GraniteMoeHybridMoE"),
    _like(GRANITEMOE, "granitemoe_swa", "GraniteMoeSWAMoE"),  # sliding-window attention, the same block
    _like(DEEPSEEK_V3, "glm4_moe", "Glm4MoeMoE"),
    _like(DEEPSEEK_V3, "glm4_moe_lite", "Glm4MoeLiteMoE"),
    _like(DEEPSEEK_V3, "glm_moe_dsa", "GlmMoeDsaMoE"),
    _like(DEEPSEEK_V3, "dots1", "Dots1MoE"),
    _like(DEEPSEEK_V3, "deepseek_v32", "DeepseekV32MoE"),
    _like(DEEPSEEK_V3, "solar_open", "SolarOpenMoE"),
    _like(DEEPSEEK_V3, "hy_v4", "HYV4MoE", expert_activation=_hy_v4_activation),
    _like(DEEPSEEK_V3, "exaone_moe", "ExaoneMoeSparseMoEBlock", num_experts_key="num_experts"),
    # Multimodal models whose text blocks route as Qwen3-MoE / Qwen3-Next with renormalisation always on
    # (their config has no `norm_topk_prob`); the blocks are patched wherever they sit in the model.
    _like(OLMOE, "qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", model_types=("qwen3_vl_moe", "qwen3_vl_moe_text"),
          router_args=_topk(lambda cfg: True), config_keys={"k": "num_experts_per_tok"}),
    _like(QWEN2_MOE, "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", model_types=("qwen3_5_moe", "qwen3_5_moe_text"),
          router_args=_topk(lambda cfg: True), config_keys={"k": "num_experts_per_tok"}),
    _like(DEEPSEEK_V3, "glm4v_moe", "Glm4vMoeTextMoE", model_types=("glm4v_moe", "glm4v_moe_text")),
    Family(
        name="phimoe",
        model_types=("phimoe",),
        block="PhimoeSparseMoeBlock",
        router="sparsemixer",
        router_args=_sparsemixer,
        num_experts_key="num_local_experts",
        config_keys={"jitter_eps": "router_jitter_noise"},  # k is always 2 in transformers' PhiMoE
        gate="router",
        notes="`input_jitter_noise` (training only, 0 by default) is not applied",
    ),
)


def family_names() -> list[str]:
    """Names of the covered families, sorted."""
    return sorted(f.name for f in FAMILIES)


def get_family(name: str) -> Family:
    """The family `name`; an unknown name lists the covered ones."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"unknown Hugging Face MoE family {name!r}; covered families: {', '.join(family_names())}")


def family_for_model_type(model_type: str) -> Family | None:
    """The family whose `model_types` include `model_type`, or None."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family_for_block(class_name: str) -> Family | None:
    """The family whose sparse MoE block class is named `class_name`, or None."""
    return next((f for f in FAMILIES if f.block == class_name), None)


def expert_activation(family: Family, config: Any) -> tuple[str, dict[str, Any]]:
    """(moekit activation name, arguments) of `family`'s routed experts under the HF `config`."""
    if family.expert_activation is not None:
        return family.expert_activation(config)
    return activation_name(config.hidden_act), {}


def activation_name(hidden_act: str) -> str:
    """moekit's name for a transformers `hidden_act`; an unsupported one names the supported."""
    try:
        return ACTIVATIONS[hidden_act]
    except KeyError:
        raise ValueError(
            f"moekit.hf: expert activation {hidden_act!r} has no moekit equivalent; supported: "
            f"{sorted(ACTIVATIONS)}"
        ) from None
