"""Patched Hugging Face models against transformers' own forward, every covered family, float32 and
bfloat16: the largest absolute logit difference for each dispatch backend (and, in float32, of the
gradients of one training step).

Models: the tiny configs of tests/hf/tiny.py ("tiny": hidden 32, 8 experts of width 16, top-2) and
their odd-size variants ("odd": hidden 40, 5-6 experts of width 13, top-3, 3 layers, the first dense
where the family has dense layers); bfloat16 models keep in float32 what transformers keeps so
(`_keep_in_fp32_modules_strict`: DeepSeek-style routers and biases, HY-V4's lm_head). Input: a
left-padded batch (3 x 12 tokens, 0/2/4 pad tokens), compared on the non-pad positions. The peer is
transformers with `experts_implementation="eager"` (its reference experts; `grouped_mm`/`batched_mm`
are its fast paths).

    python benchmarks/hf_parity.py                 # ~1 min on one CPU thread
    python benchmarks/hf_parity.py --families mixtral hy_v4

Prints a table and writes benchmarks/results/hf_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import environment, write_json  # noqa: E402

import moekit.hf as mh  # noqa: E402
from moekit.layers.dispatch import grouped_mm_available  # noqa: E402
from moekit.utils.io import atomic_write_text  # noqa: E402
from tests.hf.tiny import tiny_model  # noqa: E402

BACKENDS = ("auto", "eager", "grouped")  # auto = loop on CPU


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for b in range(3):
        ids[b, : 2 * b] = 0
        mask[b, : 2 * b] = 0
    return ids, mask


def measure(family: str, odd: bool, dtype: torch.dtype) -> dict[str, float | str]:
    """{backend: max |patched - transformers| over the non-pad logits} (a string when it fails)."""
    ref = tiny_model(family, odd=odd, dtype=None if dtype == torch.float32 else dtype)
    ids, mask = batch()
    keep = mask.bool()
    row: dict[str, float | str] = {}
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits[keep].float()
        for backend in BACKENDS:
            if backend == "grouped" and not grouped_mm_available("cpu", dtype):
                row[backend] = "n/a"
                continue
            try:
                got = mh.patch(copy.deepcopy(ref), backend=backend)(ids, attention_mask=mask).logits[keep]
                row[backend] = (got.float() - want).abs().max().item()
            except RuntimeError as e:  # e.g. grouped_mm's 16-byte stride rule at odd widths
                row[backend] = f"error: {str(e).splitlines()[0][:60]}"
    return row


def gradient_diff(family: str) -> float:
    """Max |patched - transformers| over the parameter gradients of one training step (float32, tiny
    config, default backend), loss = LM loss on a 2 x 12 batch."""
    ref = tiny_model(family).train()
    patched = mh.patch(copy.deepcopy(ref))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)  # the same random draws in both (PhiMoE samples its experts in training)
    ref(ids, labels=ids).loss.backward()
    torch.manual_seed(0)
    patched(ids, labels=ids).loss.backward()
    grads = dict(ref.named_parameters())
    return max((p.grad - grads[k].grad).abs().max().item() for k, p in patched.named_parameters() if p.grad is not None)


def fmt(v: float | str) -> str:
    return v if isinstance(v, str) else ("0" if v == 0 else f"{v:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="*", default=None, help="default: every covered family")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "hf_parity"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    families = args.families or mh.family_names()
    results: dict[str, dict] = {}
    header = "| family | sizes | " + " | ".join(f"{d} {b}" for d in ("fp32", "bf16") for b in BACKENDS) + " |"
    header += " fp32 gradients |"
    lines = [header, "|" + "---|" * (3 + 2 * len(BACKENDS))]
    print(header)
    for fam in families:
        for odd in (False, True):
            sizes = "odd" if odd else "tiny"
            cells = {}
            for dtype in (torch.float32, torch.bfloat16):
                dname = "fp32" if dtype == torch.float32 else "bf16"
                for backend, v in measure(fam, odd, dtype).items():
                    cells[f"{dname} {backend}"] = v
            if not odd:
                cells["fp32 gradients"] = gradient_diff(fam)
            results[f"{fam}/{sizes}"] = cells
            line = f"| {fam} | {sizes} | " + " | ".join(fmt(v) for v in cells.values()) + (" |" if not odd else " | |")
            lines.append(line)
            print(line, flush=True)
    write_json(f"{args.out}.json", {"environment": environment(), "max_abs_logit_diff": results})
    title = "Max |patched - transformers| logits (`python benchmarks/hf_parity.py`)"
    atomic_write_text(f"{args.out}.md", title + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
