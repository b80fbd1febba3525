"""Convert a dense model into an MoE checkpoint (what `moekit convert` does).

SRC is a moekit run or checkpoint folder, or a transformers Llama/Mistral/Qwen2/Qwen3 folder. DST is a moekit
run folder: `checkpoint/` (the MoE model; config.json keeps the source run's train and data configs, so
`moekit eval DST` and `moekit train --init DST` use the same data, plus a "convert" record of what was done)
and the source's `tokenizer.json`. With `hf_family` ("mixtral", "qwen3_moe", ...) DST is instead a transformers
checkpoint of that family written by `moekit.hf.export.export_lm` (logits checked). Either is written under a
temporary name beside DST and renamed into place: a failure leaves nothing behind, and an existing DST is
refused unless `force`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moekit.convert.source import DenseSource, load_dense
from moekit.convert.split import SplitConfig, split
from moekit.convert.upcycle import UpcycleConfig, upcycle
from moekit.models import MoELM
from moekit.models.params import count_params
from moekit.utils.io import replace_dir

METHODS = {
    "upcycle": "sparse upcycling: experts are copies of the dense FFN (Komatsuzaki et al. 2023; granular: He et "
               "al. 2024; --reinit: Drop-Upcycling)",
    "split": "MoEfication: the FFN's neurons split into experts by balanced k-means, a trained router "
             "(Zhang et al. 2022)",
    "btx": "Branch-Train-Mix: branches of one seed mixed, their FFNs as experts, the rest averaged, a new router "
           "(Sukhbaatar et al. 2024); SRC... = the branches",
    "prompts": "mergekit-moe: a base model plus dense experts, routers written from each expert's prompts, no "
               "training (Goddard et al. 2024); SRC... = base, then the experts",
    "nexus": "Nexus: branches as experts, the seed's FFN shared, a router projecting domain embeddings (Gritsch et "
             "al. 2024); SRC... = seed, then the branches",
}
COMPOSE = ("btx", "prompts", "nexus")  # methods of several dense models (moekit.convert.compose_run)


def list_methods() -> dict[str, str]:
    """Conversion methods -> one-line description."""
    return dict(METHODS)


@dataclass
class ConvertSummary:
    """What a conversion made and from what."""

    method: str
    source: str  # where the dense model came from
    dense_params: int  # parameters of the dense model
    total_params: int  # parameters of the MoE model
    active_params: int  # parameters one token uses (the routers' nominal k)
    num_experts: int
    k: int
    expert_hidden: int
    moe_blocks: list[int]
    copied: str  # what was copied from where
    out: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific numbers (router recall, ...)

    def table(self) -> str:
        lines = [
            f"{self.method}: {self.source} -> {self.out}",
            f"experts per MoE block {self.num_experts} of width {self.expert_hidden}, top-{self.k}, "
            f"MoE blocks {self.moe_blocks}",
            f"params dense {self.dense_params:,d}  MoE total {self.total_params:,d}  active {self.active_params:,d}",
            f"copied: {self.copied}",
        ]
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def convert_model(method: str, source: DenseSource, *, upcycle_cfg: UpcycleConfig | None = None,
                  split_cfg: SplitConfig | None = None, calib_batches: list | None = None
                  ) -> tuple[MoELM, ConvertSummary]:
    """The MoE model `method` makes of `source`, and its summary (no files written)."""
    if method not in METHODS or method in COMPOSE:
        raise ValueError(f"unknown conversion method {method!r}; known: {', '.join(METHODS)}")
    dense = source.model
    extra: dict[str, Any] = {}
    if method == "upcycle":
        cfg = upcycle_cfg or UpcycleConfig()
        model = upcycle(dense, cfg)
        copied = ("embeddings, attention and norms from the dense model; each expert a "
                  f"{'slice of a ' if cfg.granularity > 1 else ''}copy of its block's FFN"
                  f"{' (+noise)' if cfg.noise else ''}"
                  f"{f' ({cfg.reinit:g} of neurons re-initialised)' if cfg.reinit else ''}"
                  f"; routers new (std {cfg.router_std:g})")
        extra["starts equal to dense"] = cfg.exact
    else:
        cfg = split_cfg or SplitConfig()
        model, report = split(dense, cfg, calib_batches)
        copied = (f"embeddings, attention and norms from the dense model; each FFN's neurons split into experts "
                  f"by {cfg.cluster} clustering; routers "
                  f"{'trained on calibration data' if report.router_recall else 'zero (uniform)'}")
        if report.router_recall:
            extra["router recall of the true top-k experts per block"] = {
                b: round(r, 3) for b, r in report.router_recall.items()}
            extra["recall of a constant guess (the most frequent top-k) per block"] = {
                b: round(r, 3) for b, r in report.constant_recall.items()}
    c = model.config
    pc = count_params(c)
    summary = ConvertSummary(
        method, source.origin, count_params(dense.config).total, pc.total, pc.active, c.num_experts,
        int(c.router_args["k"]), c.expert_hidden, [i for i in range(c.n_layers) if c.is_moe_layer(i)], copied,
        extra=extra,
    )
    return model, summary


def convert_run(method: str, src: str | Path | MoELM, out: str | Path, *, upcycle_cfg: UpcycleConfig | None = None,
                split_cfg: SplitConfig | None = None, calib_batches: int = 8, calib_seq_len: int | None = None,
                hf_family: str | None = None, force: bool = False) -> ConvertSummary:
    """Convert the dense model at `src` with `method` and write DST `out` (see the module docstring)."""
    if method in COMPOSE:
        raise ValueError(f"{method} composes several dense models: use moekit.convert.compose_run.compose_run")
    if method not in METHODS:
        raise ValueError(f"unknown conversion method {method!r}; known: {', '.join(METHODS)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    source = load_dense(src)
    batches = None
    if method == "split" and (split_cfg or SplitConfig()).needs_data:
        batches = _calibration(source, calib_batches, calib_seq_len)
    model, summary = convert_model(method, source, upcycle_cfg=upcycle_cfg, split_cfg=split_cfg,
                                   calib_batches=batches)
    summary.out = str(out)
    cfg = upcycle_cfg if method == "upcycle" else split_cfg
    record = {"method": method, "source": source.origin, "config": asdict(cfg) if cfg is not None else {}}
    write_model(model, source, record, out, hf_family=hf_family, force=force)
    return summary


def write_model(model: MoELM, source: DenseSource, record: dict[str, Any], out: Path, *, hf_family: str | None,
                force: bool) -> None:
    """Write the converted `model` to `out`: a moekit run folder (the `source` run's configs and tokenizer plus the
    conversion `record`) or, with `hf_family`, a transformers checkpoint; under a temporary name, then renamed."""
    tokenizer = source.run_dir / "tokenizer.json" if source.run_dir is not None else None
    tokenizer = tokenizer if tokenizer is not None and tokenizer.is_file() else None
    if hf_family is not None:
        from moekit.hf.export import export_lm

        export_lm(model.eval(), hf_family, out, tokenizer=tokenizer, overwrite=force)
        return
    from moekit.train.checkpoint import save_checkpoint

    meta = {k: v for k, v in source.meta.items() if k not in ("step", "compress")}
    meta["convert"] = [*source.meta.get("convert", []), record]
    meta["step"] = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-convert-"))
    try:
        save_checkpoint(tmp, model, meta)
        if tokenizer is not None:
            shutil.copy2(tokenizer, tmp / "tokenizer.json")
        replace_dir(tmp, out)  # an existing DST (--force) is swapped out only once the new one is whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _calibration(source: DenseSource, n: int, seq_len: int | None) -> list:
    """Calibration batches from the source run's training data; a source without one is a clear error."""
    from moekit.compress.calibrate import calibration_batches

    train = source.meta.get("train")
    if source.run_dir is None or not isinstance(source.meta.get("data"), dict) or not isinstance(train, dict):
        raise ValueError(
            f"split with activation clustering or router training needs calibration data, which {source.origin} "
            "does not name (not a moekit training run); pass --cluster weights --router-steps 0"
        )
    return calibration_batches(source.run_dir, n, seq_len or int(train["seq_len"]))
