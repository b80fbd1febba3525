"""Export moekit's own LM (`MoELM`) as a Hugging Face transformers checkpoint of a chosen family,
with identical logits, or fail with every reason the family cannot express the model.

What each target family needs from the moekit LM is declared in `EXPORTS`; the routing part comes
from the same `moekit.hf.families` table that `patch` uses (router name, arguments fixed by the
family, arguments held in its config).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moekit.hf.families import ACTIVATIONS, LOSS_ARGS, get_family
from moekit.utils.deps import require

# moekit activation -> transformers `hidden_act` (the inverse of families.ACTIVATIONS).
HIDDEN_ACT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
assert all(ACTIVATIONS[v] == k for k, v in HIDDEN_ACT.items())


@dataclass(frozen=True)
class ExportSpec:
    """What a target family's transformers code can express of a moekit LM."""

    family: str  # moekit.hf family name (router, config keys and block attribute names)
    config_class: str  # transformers config class
    qk_norm: dict[str, dict[str, Any]]  # LMConfig.qk_norm values the attention has -> HF fields that select it
    expert_width_key: str  # HF config field of the routed expert width F
    dense: str = "none"  # dense blocks: "none" (every block MoE) | "list" (any, listed) | "first_k" (the first k)
    dense_key: str | None = None  # HF config field of the dense blocks (a list, or k)
    shared_count_key: str | None = None  # HF config field of the number of shared experts (None: no shared experts)
    extra: tuple[tuple[str, Any], ...] = ()  # fixed HF config fields
    rope_extra: tuple[tuple[str, Any], ...] = ()  # fixed entries of `rope_parameters`
    impossible: str = ""  # why no moekit LM can be exported to this family (empty: some can)


EXPORTS: dict[str, ExportSpec] = {
    "mixtral": ExportSpec("mixtral", "MixtralConfig", {"none": {}}, "intermediate_size",
                          extra=(("sliding_window", None),)),
    "olmoe": ExportSpec("olmoe", "OlmoeConfig", {"full": {}}, "intermediate_size",
                        extra=(("clip_qkv", None), ("attention_bias", False))),
    "qwen3_moe": ExportSpec("qwen3_moe", "Qwen3MoeConfig", {"head": {}}, "moe_intermediate_size",
                            dense="list", dense_key="mlp_only_layers",
                            extra=(("decoder_sparse_step", 1), ("use_sliding_window", False),
                                   ("attention_bias", False))),
    # DeepSeek-V3 routing with grouped-query attention: where moekit LMs with the `deepseek` router go.
    "glm4_moe": ExportSpec("glm4_moe", "Glm4MoeConfig",
                           {"none": {"use_qk_norm": False}, "head": {"use_qk_norm": True}}, "moe_intermediate_size",
                           dense="first_k", dense_key="first_k_dense_replace", shared_count_key="n_shared_experts",
                           extra=(("attention_bias", False),), rope_extra=(("partial_rotary_factor", 1.0),)),
    "deepseek_v3": ExportSpec(
        "deepseek_v3", "DeepseekV3Config", {}, "moe_intermediate_size",
        impossible="DeepSeek-V3 attention is multi-head latent attention (low-rank compressed keys and values "
        "behind an RMSNorm, one RoPE key shared by all heads); moekit's LM uses grouped-query attention with "
        "RoPE on every head, which MLA cannot reproduce. Its routing is moekit's 'deepseek' router: export such "
        "a model to --family glm4_moe (DeepSeek-V3 routing with grouped-query attention)",
    ),
}


class ExportError(ValueError):
    """The moekit LM cannot be written as the requested family; the message lists every reason."""


def export_targets() -> list[str]:
    """Families `export_lm` knows (some may still refuse a given model, with the reason)."""
    return sorted(EXPORTS)


def _router_config(cfg: Any, spec: ExportSpec, hf_fields: dict[str, Any], reasons: list[str]) -> None:
    """Fill the HF config fields of the routing; add a reason when the family cannot express it."""
    fam = get_family(spec.family)
    from moekit.routing import get_router

    if cfg.router != fam.router:
        reasons.append(
            f"router {cfg.router!r} is not expressible in {fam.name}, whose routing is moekit's {fam.router!r}"
        )
        return
    params = inspect.signature(get_router(cfg.router).__init__).parameters
    defaults = {p.name: p.default for p in params.values() if p.default is not inspect.Parameter.empty}
    args = {**defaults, **cfg.router_args}
    for arg, key in fam.config_keys.items():
        hf_fields[key] = args[arg]
    hf_fields[fam.num_experts_key] = cfg.num_experts
    native = fam.router_args(_Fields(hf_fields))
    for arg, value in args.items():
        if arg in LOSS_ARGS or arg in fam.config_keys:
            continue
        if arg not in native:  # the family has no such setting: only the router's default is expressible
            if arg in defaults and value != defaults[arg]:
                reasons.append(
                    f"{fam.name} routing has no equivalent of {arg}={value!r} (only the default {defaults[arg]!r})"
                )
            continue
        if native[arg] != value and not (arg == "routed_scale" and native[arg] == 1.0):
            # a routed scale the family lacks is folded into the experts' down projections (`folded_scales`)
            reasons.append(f"{fam.name} routing fixes {arg}={native[arg]!r}; the model's router has {arg}={value!r}")


class _Fields:
    """Attribute view of a dict of HF config fields (what `Family.router_args` reads)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


def hf_config_for(lm_config: Any, family: str) -> Any:
    """The transformers config of `family` equivalent to a moekit `LMConfig`; raises `ExportError`
    listing every feature the family cannot express."""
    transformers = require("transformers")
    if family not in EXPORTS:
        raise ExportError(f"unknown export family {family!r}; known: {', '.join(export_targets())}")
    spec, cfg = EXPORTS[family], lm_config
    fam = get_family(spec.family)
    if spec.impossible:
        raise ExportError(f"cannot export to {family}: {spec.impossible}")
    reasons: list[str] = []
    if not cfg.num_experts:
        reasons.append("the model is dense (num_experts=0); export needs an MoE model")
    per_layer = getattr(cfg, "num_experts_per_layer", None)
    if per_layer is not None and len({c for c in per_layer if c}) > 1:
        reasons.append(f"its MoE layers have different expert counts {per_layer} "
                       f"(num_experts_per_layer); a {family} config holds one expert count for all layers")
    fields: dict[str, Any] = {}
    if cfg.num_experts:
        _router_config(cfg, spec, fields, reasons)
    if cfg.qk_norm not in spec.qk_norm:
        want = " or ".join(repr(q) for q in spec.qk_norm)
        reasons.append(f"{family} attention has qk_norm={want} but the model has qk_norm={cfg.qk_norm!r} "
                       f"(train with --set qk_norm={next(iter(spec.qk_norm))})")
    if cfg.capacity_factor is not None:
        reasons.append("capacity_factor drops tokens; transformers' MoE blocks are dropless")
    if getattr(cfg, "moe_iterations", 1) != 1:
        reasons.append("moe_iterations > 1 (Chain-of-Experts) has no transformers equivalent")
    if getattr(cfg, "mod_capacity", 1.0) < 1:
        reasons.append("mod_capacity < 1 (mixture-of-depths blocks) has no transformers equivalent")
    if getattr(cfg, "share_blocks", False):
        reasons.append("share_blocks (WideNet) has no transformers equivalent")
    if getattr(cfg, "experts", "ffn") != "ffn":
        reasons.append(f"experts={cfg.experts!r} is not a standard feed-forward expert")
    if cfg.num_shared_experts and spec.shared_count_key is None:
        reasons.append(f"{family} has no shared experts; the model has {cfg.num_shared_experts}")
    if cfg.shared_gate and fam.shared_gate is None:
        reasons.append(f"{family} has no shared-expert gate")
    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if dense and spec.dense == "none":
        reasons.append(f"every {family} block is MoE; the model has dense blocks {dense}")
    if spec.dense == "first_k" and dense != list(range(len(dense))):
        reasons.append(f"{family} can only make the first k blocks dense; the model has dense blocks {dense}")
    if cfg.activation not in HIDDEN_ACT:
        reasons.append(f"activation {cfg.activation!r} has no transformers name")
    if reasons:
        raise ExportError(f"cannot export to {family}: " + "; ".join(reasons))
    fields.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        hidden_act=HIDDEN_ACT[cfg.activation],
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta), **dict(spec.rope_extra)},
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    fields[spec.expert_width_key] = cfg.expert_hidden
    if spec.expert_width_key != "intermediate_size":
        fields["intermediate_size"] = cfg.ffn_hidden
    if spec.dense_key is not None:
        fields[spec.dense_key] = dense if spec.dense == "list" else len(dense)
    if spec.shared_count_key is not None:
        fields[spec.shared_count_key] = cfg.num_shared_experts
    fields.update(spec.qk_norm[cfg.qk_norm])
    fields.update(dict(spec.extra))
    config = getattr(transformers, spec.config_class)(**fields)
    config.architectures = [spec.config_class.replace("Config", "ForCausalLM")]
    return config


def folded_scales(cfg: Any) -> tuple[float, float]:
    """(routed, other): the factors the export multiplies into the down projections of the routed experts and of
    every other feed-forward (dense MLPs, shared experts), so that a model trained with `ffn_out_mult` or a
    router's `routed_scale` (which transformers' top-k blocks lack) gives the same outputs. Both are linear
    scalings of a feed-forward's output, and `down @ h * s == (s * down) @ h` (up to one rounding)."""
    other = float(getattr(cfg, "ffn_out_mult", 1.0))
    # `hf_config_for` refuses a routed_scale the family cannot take this way (it folds it only where the family's
    # routing is the router's with routed_scale 1: transformers' top-k families)
    routed = other * float(cfg.router_args.get("routed_scale", 1.0) if cfg.num_experts else 1.0)
    return routed, other


def hf_state_dict(model: Any, family: str) -> dict[str, torch.Tensor]:
    """moekit LM tensors under the transformers names of `family` (no copies, except down projections that
    carry a folded output scale: `folded_scales`)."""
    fam = get_family(EXPORTS[family].family)
    routed, other = folded_scales(model.config)
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            out[key] = t
            continue
        if key.endswith(".mlp.experts.down_proj") and routed != 1:
            t = t * routed
        elif key.endswith("down_proj.weight") and ".mlp." in key and other != 1:
            t = t * other
        k = key.replace(".mlp.router.", f".mlp.{fam.gate}.")
        if fam.shared is not None:
            k = k.replace(".mlp.shared_experts.", f".mlp.{fam.shared}.")
        if fam.shared_gate is not None:
            k = k.replace(".mlp.shared_expert_gate.", f".mlp.{fam.shared_gate}.")
        out["model." + k] = t
    return out


def to_hf(model: Any, family: str) -> Any:
    """A transformers model of `family` holding a moekit `MoELM`'s weights (in eval mode)."""
    require("transformers")
    from transformers import AutoModelForCausalLM

    config = hf_config_for(model.config, family)
    p = next(model.parameters())
    # eager experts: the reference, and transformers' grouped_mm experts fail at odd widths (F = 13 in fp32)
    hf = AutoModelForCausalLM.from_config(config, dtype=p.dtype, experts_implementation="eager").to(p.device)
    state = hf_state_dict(model, family)
    expected = hf.state_dict()
    for k, t in expected.items():  # e.g. a shared expert of width 0 (no shared experts): nothing to carry
        if k not in state and t.numel() == 0:
            state[k] = t
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ExportError(
            f"cannot export to {family}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}"
        )
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def check_logits(model: Any, hf: Any, *, tokens: int = 16, atol: float = 1e-4) -> float:
    """Max |logit difference| of the two models on random tokens; raises `ExportError` above atol."""
    g = torch.Generator().manual_seed(0)
    L = min(tokens, model.config.max_seq_len)
    ids = torch.randint(0, model.config.vocab_size, (1, L), generator=g).to(next(model.parameters()).device)
    was = model.training
    model.eval()
    with torch.no_grad():
        diff = float((model(ids).logits.float() - hf(ids).logits.float()).abs().max())
    model.train(was)
    if not diff <= atol:
        raise ExportError(f"exported logits differ from the moekit model by {diff:.3g} (> {atol})")
    return diff


def write_tokenizer(tokenizer_json: str | Path, out: str | Path, *, model_max_length: int) -> None:
    """Put a moekit tokenizer (`tokenizer.json`, the `tokenizers` format) into a transformers folder:
    the file itself and a `tokenizer_config.json` naming `PreTrainedTokenizerFast` and the end-of-text
    token, so `AutoTokenizer.from_pretrained(out)` loads it offline with the same token ids."""
    import json
    import shutil

    from moekit.data.tokenizer import EOS_TOKEN

    out = Path(out)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_lm(
    model: Any,
    family: str,
    out: str | Path,
    *,
    check: bool = True,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write moekit LM `model` as a transformers `family` checkpoint in `out` (`save_pretrained`
    layout; loads with `AutoModelForCausalLM.from_pretrained`), with the run's `tokenizer` (a
    `tokenizer.json`) when given. With `check`, first verify that the transformers model gives the
    same logits. Raises `ExportError` with the reasons when the family cannot express the model, and
    `FileExistsError` when `out` exists and not `overwrite`; nothing is written then. The folder is
    written under a temporary name and renamed into place, so a failure leaves no half export and an
    overwritten export is replaced in one step (`moekit.utils.io.replace_dir`; an export killed between its
    two renames is put back in order here first)."""
    import shutil
    import tempfile

    from moekit.utils.io import recover_dir, replace_dir

    out = Path(out)
    recover_dir(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    hf = to_hf(model, family)
    if check:
        check_logits(model, hf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        hf.save_pretrained(str(tmp))
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, model_max_length=model.config.max_seq_len)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(out)  # failed between the renames: put the old export back
        raise
    return out
