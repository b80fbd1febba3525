"""Open built reference models: `load` (the model), `load_tokenizer`, `export_hf` (a transformers checkpoint),
`built` (what the cache holds)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moekit.data import BPETokenizer, cache_root
from moekit.models import MoELM
from moekit.ref.budgets import BUDGETS, check_model, get_budget
from moekit.ref.builder import build_command, run_dir
from moekit.train.checkpoint import has_checkpoint, load_model, read_meta

# transformers family each reference MoE exports to by default (moekit.hf.export says what it cannot express)
HF_FAMILY = {"ref-moe": "mixtral", "ref-moe-fg": "qwen3_moe"}  # ref-moe-fg: refused (shared experts), see docs


def built_dir(name: str = "ref-moe", budget: str = "ref", seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The run folder of a finished reference model; FileNotFoundError naming the command that builds it."""
    check_model(name)
    b = get_budget(budget)
    folder = run_dir(name, b.name, seed, cache_dir)
    cmd = build_command([name], b.name, seed)
    if cache_dir is not None:
        cmd = f"MOEKIT_CACHE={cache_root(cache_dir)} {cmd}"
    if not has_checkpoint(folder):
        raise FileNotFoundError(f"reference model {name} (budget {b.name}, seed {seed}) is not built "
                                f"(nothing in {folder}); run `{cmd}`")
    step = read_meta(folder).get("step")
    if step != b.steps:
        raise FileNotFoundError(f"reference model {name} (budget {b.name}, seed {seed}) is only trained to step "
                                f"{step} of {b.steps} in {folder}; run `{cmd}` to finish it")
    return folder


def load(name: str = "ref-moe", budget: str = "ref", seed: int = 0, cache_dir: str | Path | None = None,
         *, map_location: str = "cpu") -> MoELM:
    """The built reference model `name`, in eval mode."""
    return load_model(built_dir(name, budget, seed, cache_dir), map_location=map_location).eval()


def load_tokenizer(name: str = "ref-moe", budget: str = "ref", seed: int = 0,
                   cache_dir: str | Path | None = None) -> BPETokenizer:
    """The tokenizer the reference model `name` was trained with (the same for every model of a budget)."""
    return BPETokenizer.load(built_dir(name, budget, seed, cache_dir) / "tokenizer.json")


def export_hf(name: str, out_dir: str | Path, budget: str = "ref", seed: int = 0,
              cache_dir: str | Path | None = None, *, family: str | None = None, overwrite: bool = False,
              check: bool = True) -> Path:
    """Write the built reference model `name` as a transformers checkpoint in `out_dir` (family: HF_FAMILY's
    by default), with its tokenizer and logits checked against moekit's. Raises moekit.hf.export's ExportError
    with every reason when the family cannot express the model."""
    from moekit.hf.export import export_lm

    folder = built_dir(name, budget, seed, cache_dir)
    if family is None:
        if name not in HF_FAMILY:
            raise ValueError(f"{name} is a dense model: transformers MoE families need experts; "
                             f"reference MoEs: {', '.join(HF_FAMILY)}")
        family = HF_FAMILY[name]
    # routed_scale has no Mixtral field: the export multiplies it into the experts' down projections
    return export_lm(load_model(folder), family, out_dir, check=check, tokenizer=folder / "tokenizer.json",
                     overwrite=overwrite)


def built(cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every reference run in the cache: budget, model, seed, folder, step, steps, status (done | partial)."""
    rows = []
    root = cache_root(cache_dir) / "ref"
    for bdir in sorted(p for p in root.glob("*") if p.is_dir()):
        for folder in sorted(p for p in bdir.glob("*-s*") if p.is_dir()):
            m = re.fullmatch(r"(.+)-s(\d+)", folder.name)
            if not m or not has_checkpoint(folder):
                continue
            step = read_meta(folder).get("step")
            steps = get_budget(bdir.name).steps if bdir.name in BUDGETS else None
            rows.append({"budget": bdir.name, "model": m.group(1), "seed": int(m.group(2)), "path": str(folder),
                         "step": step, "steps": steps, "status": "done" if step == steps else "partial"})
    return rows

