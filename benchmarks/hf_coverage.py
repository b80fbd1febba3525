"""Which sparse MoE blocks of the installed transformers `moekit.hf.patch` covers, measured.

Scans `transformers/models/*/modeling_*.py` for sparse MoE blocks (a class that assigns
`self.experts = ...`, plus the blocks `moekit.hf.FAMILIES` names), and for each model folder:

- covered (a `moekit.hf` family's block): builds the odd-size tiny model of tests/hf/tiny.py (hidden
  40, 5-6 experts, top-3 where the family allows it, width 13, dense first layers, random selection
  biases), patches it and measures against transformers (`experts_implementation="eager"`): the
  largest |logit difference| on a left-padded batch (non-pad positions) in float32 and bfloat16,
  whether cached greedy generation is identical, the |logit difference| after `moekit.hf.save` ->
  `from_pretrained`, and whether `moekit export --to hf` can target the family;
- not covered: builds a tiny model from the family's default config shrunk to a few small layers
  (where that is possible offline) and checks that `patch` raises the clear "not covered"
  ValueError (never another exception); the reason is docs/hf.md's.

    python benchmarks/hf_coverage.py                     # a few minutes on one CPU thread
    python benchmarks/hf_coverage.py --only phimoe dbrx  # some folders (scan still over all)
    python benchmarks/hf_coverage.py --docs              # also rewrite the table in docs/hf.md

Writes benchmarks/results/hf_coverage.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import environment, write_json  # noqa: E402

import moekit.hf as mh  # noqa: E402
from moekit.hf.families import FAMILIES, family_for_block  # noqa: E402
from moekit.utils.io import atomic_write_text  # noqa: E402

DOCS = ROOT.parent / "docs" / "hf.md"
BEGIN, END = "<!-- hf_coverage:begin -->", "<!-- hf_coverage:end -->"

# Why a block is not covered: the one operation moekit's MoE contract does not express yet (docs/hf.md,
# "Not covered"). A folder missing here is reported as "not covered (no reason recorded)".
REASONS = {
    "gpt_oss": "expert biases, interleaved [E, D, 2F] layout (needs an Experts layout option); router bias, "
               "softmax of the top-k logits",
    "openai_privacy_filter": "as GPT-OSS: expert biases, interleaved [E, D, 2F] layout",
    "llama4": "a routed expert's input (not output) is scaled by its sigmoid score; experts stored [E, D, 2F]",
    "dbrx": "experts stored as flat [E*F, D] w1/v1/w2 (needs an Experts layout option); p-norm weight "
            "normalisation",
    "jetmoe": "mixture of attention heads; experts in input_linear/output_linear with an output bias",
    "doge": "product-key retrieval experts (CDMoE)",
    "switch_transformers": "encoder-decoder, one module per expert, capacity-limited routing",
    "nllb_moe": "encoder-decoder, one module per expert, capacity-limited routing",
    "inkling": "shared experts scored by the router (softmax over routed and shared log-sigmoids)",
    "inkling2": "selection bias stored on the block, passed to the router",
    "inkling2_loop": "selection bias stored on the block, passed to the router",
    "laguna": "tanh soft-capped router logits",
    "kolibri1": "bias added to the logits, sigmoid of the chosen logits",
    "minimax_m2": "selection bias stored on the block (`e_score_correction_bias`), passed to the router",
    "minimax_m3_vl": "selection bias stored on the block, passed to the router",
    "hy_v3": "selection bias stored on the block, passed to the router",
    "afmoe": "selection bias stored on the block, passed to the router",
    "lfm2_moe": "selection bias stored on the block; +1e-6 in the normaliser",
    "muse_spark": "a residual gate around the experts",
    "longcat_flash": "zero-computation experts; router weight in `classifier`",
    "zaya": "an MLP router",
    "cohere2_moe": "sigmoid or softmax of the top-k logits, chosen in the config",
    "flint": "sigmoid top-k routing forced to float32",
    "gemma4": "router and experts inside the decoder layer (no block to replace)",
    "diffusion_gemma": "router and experts inside the decoder layer (no block to replace)",
    "deepseek_v4": "hash and top-k routers side by side",
    "ernie4_5_moe": "nested router tensors (`gate.moe_statics.e_score_correction_bias`) not reproduced",
    "ernie4_5_vl_moe": "nested router tensors; text and vision experts in one block",
    "hunyuan_v1_moe": "nested router tensor `gate.wg.weight`; per-layer expert counts",
    "axk1": "a layer norm after the block",
    "axk2": "a layer norm after the block",
    "nemotron_h": "latent projections around the experts",
    "aria": "experts stored [E, D, 2F] (needs an Experts layout option)",
    "vitpose_backbone": "a vision backbone's per-dataset expert MLP (not a routed MoE)",
    "granitemoe_swa": "GraniteMoE block, not yet tested here",
    "kimi_linear": "DeepSeek-V3 block, not yet tested here (hybrid linear attention)",
    "bailing_hybrid": "DeepSeek-V3 block, not yet tested here (hybrid linear attention)",
    "glm5_next": "DeepSeek-V3 block, not yet tested here (no AutoModelForCausalLM mapping)",
    "mimo_v2_flash": "DeepSeek-V3 block without shared experts, not yet tested here",
    "dots3_note": "DeepSeek-V3 block in a multimodal model, not yet tested here",
    "beam": "DeepSeek-V3 routing, scaling on the block, not yet tested here",
    "step3p7": "DeepSeek-V3 routing without groups, not yet tested here",
    "deepseek_ocr2": "DeepSeek-V2 block in a multimodal model, not yet tested here",
    "unlimited_ocr": "DeepSeek-V2 block in a multimodal model, not yet tested here",
    "mistral4": "softmax group-limited routing, not yet tested here",
    "mistral_large4": "softmax group-limited routing, not yet tested here",
    "qwen3_omni_moe": "Qwen3-MoE blocks under two class names (thinker, talker) in one model",
    "qwen4_exp": "not yet examined",
    "lara_mini": "not yet examined",
}

# Shrinks a default config: every field of these names the config class has (also in its sub-configs).
SHRINK = dict(
    vocab_size=96, pad_token_id=0, hidden_size=32, num_hidden_layers=2, num_layers=2, n_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=32, moe_intermediate_size=16, ffn_hidden_size=16,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_k=2, n_group=1, topk_group=1, max_position_embeddings=64, d_model=32, d_ff=32, d_kv=8, num_heads=4,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=32, decoder_ffn_dim=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=0, shared_expert_intermediate_size=16,
)


def scan(models_dir: Path) -> dict[str, list[str]]:
    """{model folder: [sparse MoE block class names]} of the installed transformers."""
    known = {f.block for f in FAMILIES}
    found: dict[str, list[str]] = {}
    for path in sorted(models_dir.glob("*/modeling_*.py")):
        src = path.read_text(encoding="utf-8")
        blocks = []
        for m in re.finditer(r"^class (\w+)\(.*?\):\n(.*?)(?=^class |\Z)", src, re.S | re.M):
            name, body = m.group(1), m.group(2)
            if name in known or re.search(r"self\.experts\s*=", body) or name.endswith("CDMoE"):
                blocks.append(name)
        if blocks:
            found.setdefault(path.parent.name, []).extend(b for b in blocks if b not in found.get(path.parent.name, []))
    return found


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for b in range(3):
        ids[b, : 2 * b] = 0
        mask[b, : 2 * b] = 0
    return ids, mask


def measure_covered(family: str) -> dict[str, Any]:
    """Parity of the patched odd-size tiny model of `family` against transformers."""
    from tests.hf.tiny import auto_class, tiny_model

    ids, mask = _batch()
    keep = mask.bool()
    row: dict[str, Any] = {}
    ref = tiny_model(family, odd=True)
    patched = mh.patch(copy.deepcopy(ref), backend="eager")
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = patched(ids, attention_mask=mask).logits
        row["fp32"] = (got[keep] - want[keep]).abs().max().item()
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        row["generation"] = bool(torch.equal(patched.generate(ids, **kw), ref.generate(ids, **kw)))
        ref16 = tiny_model(family, odd=True, dtype=torch.bfloat16)
        want16 = ref16(ids, attention_mask=mask).logits[keep].float()
        got16 = mh.patch(copy.deepcopy(ref16))(ids, attention_mask=mask).logits[keep].float()
        row["bf16"] = (got16 - want16).abs().max().item()
        with tempfile.TemporaryDirectory() as tmp:
            mh.save(patched, tmp)
            loaded = auto_class(ref.config).from_pretrained(tmp, attn_implementation="eager",
                                                            experts_implementation="eager").eval()
            row["save"] = (loaded(ids, attention_mask=mask).logits[keep] - got[keep]).abs().max().item()
    row["export"] = family in mh.export_targets()
    return row


def _shrink(config: Any) -> Any:
    """The config with SHRINK's fields set where it has them, recursively into sub-configs."""
    from transformers import PretrainedConfig

    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set(vars(config))
    for k, v in SHRINK.items():
        if k in fields:
            try:
                setattr(config, k, v)
            except Exception:  # noqa: BLE001 - a validated field: keep its default
                pass
    for k in ("layer_types", "mlp_layer_types"):
        if isinstance(getattr(config, k, None), list):
            seq = getattr(config, k)
            setattr(config, k, seq[-2:] if len(seq) >= 2 else seq)
    for k in list(fields):
        sub = getattr(config, k, None)
        if isinstance(sub, PretrainedConfig):
            _shrink(sub)
    return config


def check_not_covered(model_type: str) -> str:
    """Build a tiny model of `model_type` and patch it: "raises" (the clear not-covered ValueError),
    "not built: ..." (no tiny model offline), or "CRASH: ..." (patch raised something else)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = _shrink(AutoConfig.for_model(model_type))
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - report why no tiny model could be built
        return f"not built: {type(e).__name__}: {str(e).splitlines()[0][:70] if str(e) else ''}"
    try:
        mh.patch(model)
    except ValueError as e:
        return "raises" if "no sparse MoE block of a supported family" in str(e) else f"CRASH: {e}"[:90]
    except Exception as e:  # noqa: BLE001 - the point: report any other exception
        return f"CRASH: {type(e).__name__}: {e}"[:90]
    return "CRASH: patched although not covered"


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return "0" if v == 0 else f"{v:.1e}"
    return str(v)


def table(rows: dict[str, dict[str, Any]]) -> str:
    head = ("| model folder | block | status | fp32 max \\|Δlogit\\| | cached generation | bf16 max \\|Δlogit\\| "
            "| save → from_pretrained | export |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for folder, r in sorted(rows.items()):
        blocks = ", ".join(f"`{b}`" for b in r["blocks"])
        if r["status"] == "exact" or r["status"].startswith("covered"):
            cells = [fmt(r[k]) for k in ("fp32", "generation", "bf16", "save")] + ["yes" if r["export"] else "—"]
            lines.append(f"| {folder} | {blocks} | {r['status']} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"| {folder} | {blocks} | {r['status']} | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="model folders to measure (default: all)")
    ap.add_argument("--docs", action="store_true", help="rewrite the generated table in docs/hf.md")
    ap.add_argument("--out", default=str(ROOT / "results" / "hf_coverage"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()

    found = scan(Path(transformers.__file__).parent / "models")
    rows: dict[str, dict[str, Any]] = {}
    for folder, blocks in found.items():
        if args.only and folder not in args.only:
            continue
        fams = {f.name for b in blocks if (f := family_for_block(b)) is not None}
        row: dict[str, Any] = {"blocks": blocks}
        if fams:
            family = sorted(fams)[0]
            try:
                row.update(measure_covered(family))
                row["status"] = "exact" if row["fp32"] == 0 and row["generation"] else f"covered ({family})"
            except Exception as e:  # noqa: BLE001 - a covered family that fails is reported, not hidden
                row["status"] = f"CRASH: {type(e).__name__}: {str(e).splitlines()[0][:70]}"
        else:
            check = check_not_covered(folder)
            reason = REASONS.get(folder, "no reason recorded")
            row["status"] = f"not covered: {reason}" + ("" if check == "raises" else f" ({check})")
            row["patch"] = check
        rows[folder] = row
        print(f"{folder}: {row['status']}", flush=True)
    md = table(rows)
    exact = sum(r["status"] == "exact" for r in rows.values())
    crashes = [f for f, r in rows.items() if "CRASH" in r["status"]]
    summary = (f"{len(rows)} model folders with sparse MoE blocks in transformers {transformers.__version__}: "
               f"{exact} exact, {len(rows) - exact} not covered, {len(crashes)} crashes"
               + (f" ({', '.join(crashes)})" if crashes else "") + ".")
    print(summary)
    write_json(f"{args.out}.json", {"environment": environment(), "summary": summary, "rows": rows})
    title = "Coverage of transformers' sparse MoE blocks (`python benchmarks/hf_coverage.py`)"
    atomic_write_text(f"{args.out}.md", f"{title}\n\n{summary}\n\n{md}\n")
    if args.docs and not args.only:
        text = DOCS.read_text(encoding="utf-8")
        if BEGIN not in text:
            raise SystemExit(f"docs/hf.md has no {BEGIN} ... {END} markers")
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        DOCS.write_text(f"{pre}{BEGIN}\n{summary}\n\n{md}\n{END}{post}", encoding="utf-8")


if __name__ == "__main__":
    main()
