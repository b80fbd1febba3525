"""Tiny transformers MoE models for the tests, built from configs (offline, seconds on a CPU)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


def tiny_config(family: str):
    """A 2-layer config of `family` with 8 experts of width 16, top-2 (DeepSeek, GLM-4.5, dots.llm1:
    the first layer dense; MiniMax, Qwen3-Next, Jamba: one linear-attention/Mamba layer)."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                                 num_experts_per_tok=2, head_dim=8, norm_topk_prob=True)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},  # MLA: one key/value head per query head
            intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )
    if family == "deepseek_v2":
        return tf.DeepseekV2Config(
            **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.0,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        )
    if family == "minimax":
        return tf.MiniMaxConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                                head_dim=8, layer_types=["linear_attention", "full_attention"])
    if family == "flex_olmo":
        return tf.FlexOlmoConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "qwen3_next":
        return tf.Qwen3NextConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=8, num_experts_per_tok=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
        )
    if family == "jamba":
        return tf.JambaConfig(**COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                              attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                              mamba_d_state=4, mamba_d_conv=4, mamba_expand=2)
    if family == "granitemoe":
        return tf.GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "phimoe":  # a wide SparseMixer threshold: several experts compete in each slot
        return tf.PhimoeConfig(**COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                               router_jitter_noise=0.3)
    if family in GENERIC:
        return generic_config(family)
    if family in MULTIMODAL:
        return multimodal_config(family)
    raise KeyError(family)


# Multimodal models (a vision tower and a text model with MoE blocks): tiny text and vision sub-configs.
MULTIMODAL = ("qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe")
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, patch_size=4, num_position_embeddings=16,
              deepstack_visual_indexes=[0])
LINEAR_ATTENTION = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=8)


def multimodal_config(family: str, *, odd: bool = False):
    """A multimodal config of `family` whose text model has the sizes of `tiny_config` (or `odd_config`):
    Qwen3.5-MoE with one linear-attention (Gated DeltaNet) layer first; GLM-4.5V with DeepSeek-V3 groups
    (6 experts in 3 groups at odd sizes) and head width 12 (its 3-axis RoPE needs 3 frequencies)."""
    from transformers import AutoConfig

    text = {k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}
    text.update(head_dim=8, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                num_experts=8, num_experts_per_tok=2)
    if odd:
        text.update(hidden_size=40, head_dim=10, num_hidden_layers=3, intermediate_size=26, moe_intermediate_size=13,
                    shared_expert_intermediate_size=13, num_experts=5, num_experts_per_tok=3)
    if family == "glm4v_moe":  # DeepSeek-V3 routing (groups, shared expert, first layer dense); 3-axis RoPE
        E = text.pop("num_experts")
        text.update(n_routed_experts=E if not odd else 6, n_group=4 if not odd else 3, topk_group=2,
                    first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, head_dim=12,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 1],
                                     "partial_rotary_factor": 0.5})
    if family == "qwen3_5_moe":
        kinds = ["linear_attention"] + ["full_attention"] * (text["num_hidden_layers"] - 1)
        text.update(LINEAR_ATTENTION, layer_types=kinds)
    cls = type(AutoConfig.for_model(family))
    return cls(text_config=text, vision_config={**VISION, "out_hidden_size": text["hidden_size"]},
               tie_word_embeddings=False)


def auto_class(config):
    """The transformers auto class that builds `config`'s generative model: AutoModelForCausalLM, or
    AutoModelForImageTextToText for multimodal models it has no mapping for."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return AutoModelForCausalLM if causal else AutoModelForImageTextToText


# Families whose config takes the usual field names: only the fields their config class has are set.
GENERIC = ("glm4_moe", "dots1", "glm4_moe_lite", "glm_moe_dsa", "deepseek_v32", "solar_open", "hy_v4", "mellum",
           "granitemoeshared", "granitemoehybrid", "exaone_moe", "granitemoe_swa")
SIZES = dict(
    intermediate_size=48, moe_intermediate_size=16, head_dim=8, n_routed_experts=8, num_experts=8, num_local_experts=8,
    num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
    routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    index_head_dim=8, index_n_heads=2, index_topk=4,
)

EXTRA = {  # one Mamba-2 layer, one attention layer
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
                             layer_types=["mamba", "attention"]),
}


def generic_config(model_type: str):
    """A tiny config of `model_type` from COMMON and SIZES (MLA-style families: kv heads = heads)."""
    import dataclasses

    from transformers import AutoConfig

    cls = type(AutoConfig.for_model(model_type))
    names = {f.name for f in dataclasses.fields(cls)}
    extra = EXTRA.get(model_type, {})
    kw = {k: v for k, v in {**COMMON, **SIZES, "num_key_value_heads": 4, **extra}.items() if k in names}
    return cls(**kw)


# Odd sizes (odd_config): nothing a multiple of 8, top-3, the first layer dense where the family
# has dense layers, groups where it routes by groups.
ODD = dict(
    hidden_size=40, head_dim=10, moe_intermediate_size=13, shared_expert_intermediate_size=13,
    shared_intermediate_size=13, num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=1,
    num_shared_experts=1, routed_scaling_factor=2.5, num_hidden_layers=3, first_k_dense_replace=1,
    mlp_only_layers=[0], mlp_layer_types=["dense", "sparse", "sparse"], kv_lora_rank=12, q_lora_rank=12,
    qk_rope_head_dim=8, qk_nope_head_dim=6, v_head_dim=6, index_head_dim=8, index_n_heads=2, index_topk=4,
)
ODD_EXTRA = {
    "deepseek_v2": dict(topk_method="group_limited_greedy", routed_scaling_factor=2.0),
    "minimax": dict(layer_types=["linear_attention", "full_attention", "full_attention"]),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=4, mamba_d_conv=4, mamba_expand=2),
    "granitemoehybrid": dict(mamba_n_heads=4, mamba_d_head=20, mamba_d_state=8, mamba_n_groups=1,
                             layer_types=["mamba", "attention", "attention"]),
    "hy_v4": dict(swiglu_limit=0.1),  # small enough that both clamps bind
    "phimoe": dict(router_jitter_noise=0.3),
}
MLA = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite", "glm_moe_dsa", "deepseek_v32", "hy_v4")


def odd_config(family: str):
    """A config of `family` at odd sizes: hidden 40, 5 experts (6 in 3 groups where the family
    routes by groups, top-2 groups), top-3, expert width 13, shared experts of width 13 where it has
    them, 3 layers with the first dense where it has dense layers (hybrid families: one linear-attention
    or Mamba layer first)."""
    import dataclasses

    if family in MULTIMODAL:
        return multimodal_config(family, odd=True)
    cls = type(tiny_config(family))
    names = {f.name for f in dataclasses.fields(cls)}
    E = 6 if "n_group" in names else 5
    kw = {**COMMON, **ODD, "n_routed_experts": E, "num_experts": E, "num_local_experts": E,
          # the expert width where the config has no separate field for it, else the dense layers' width
          "intermediate_size": 26 if "moe_intermediate_size" in names else 13,
          **({"num_key_value_heads": 4} if family in MLA else {}), **ODD_EXTRA.get(family, {})}
    return cls(**{k: v for k, v in kw.items() if k in names})


def tiny_model(family: str, seed: int = 0, *, odd: bool = False, dtype: torch.dtype | None = None):
    """A randomly initialised tiny model (eager attention and experts), in eval mode, with
    non-trivial router weights (and a non-zero DeepSeek score-correction bias). `odd`: at the sizes
    of `odd_config`. `dtype` (e.g. bfloat16): the same weights in that dtype, the modules transformers
    keeps in float32 (`_keep_in_fp32_modules_strict`) kept so, as `from_pretrained(dtype=...)` does."""
    torch.manual_seed(seed)
    config = odd_config(family) if odd else tiny_config(family)
    kw = dict(attn_implementation="eager", experts_implementation="eager")
    auto = auto_class(config)
    model = auto.from_config(config, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):
                p.normal_(std=0.5)  # spread the router scores so top-k choices are not near-ties
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.1, 0.1)
    if dtype is not None:
        cast = auto.from_config(config, dtype=dtype, **kw)
        cast.load_state_dict(model.state_dict())
        model = cast
    return model.eval()
