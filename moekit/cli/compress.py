"""`moekit compress`: prune, merge (MC-SMoE) or decompose (SVD) the experts of a trained moekit run into a new
run folder, or prune the experts of a Hugging Face MoE checkpoint into a checkpoint transformers loads; distil a
teacher run into a student run, or fine-tune a run's experts to binary / ternary weights (quantization-aware)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def compress(
    method: Annotated[str | None, typer.Argument(help="compression method (see --list)")] = None,
    run: Annotated[Path | None, typer.Argument(
        help="run directory written by `moekit train`, or a Hugging Face checkpoint directory")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="new run (or Hugging Face checkpoint) directory")] = None,
    ratio: Annotated[float | None, typer.Option(
        help="fraction removed, in (0, 1): of the experts per MoE layer (pruning, mcsmoe; default 0.25) or of the "
             "routed expert parameters (svd, unless --rank)")] = None,
    rank: Annotated[int | None, typer.Option(
        help="svd: rank of every layer's expert deltas; mcsmoe: rank of the low-rank + sparse step after merging")
    ] = None,
    sparsity: Annotated[float, typer.Option(
        help="mcsmoe with --rank: fraction of the low-rank residual's entries zeroed, in [0, 1]")] = 0.0,
    calib_batches: Annotated[int, typer.Option(help="calibration batches (a run: from its train split)")] = 16,
    calib_seq_len: Annotated[int | None, typer.Option(
        help="calibration window (default: the run's seq_len; 256 for a Hugging Face checkpoint)")] = None,
    calib: Annotated[Path | None, typer.Option(
        help="Hugging Face SRC only: calibration file, token ids (.json list, .npy) or text (tokenized with "
             "the checkpoint's tokenizer); default: the built-in corpus")] = None,
    budget: Annotated[str, typer.Option(
        help="pruning: uniform (--ratio of every layer) | adaptive (the same total, spread over the layers by "
             "their reconstruction error; moekit runs only)")] = "uniform",
    protect_super: Annotated[bool, typer.Option("--protect-super/--no-protect-super",
                                                help="keep super experts (the analyze rule)")] = True,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="print validation loss before/after")] = True,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out directory")] = False,
    student: Annotated[Path | None, typer.Option(
        help="distill: the student run (e.g. a pruned copy of RUN, the teacher)")] = None,
    steps: Annotated[int, typer.Option(help="distill, qat: training steps")] = 100,
    lr: Annotated[float, typer.Option(help="distill, qat: peak learning rate")] = 3e-4,
    batch_size: Annotated[int | None, typer.Option(help="distill, qat: sequences per step (default: the run's)")
    ] = None,
    alpha: Annotated[float, typer.Option(help="distill: weight of tau^2 x KL(teacher || student)")] = 1.0,
    temperature: Annotated[float, typer.Option(help="distill: softmax temperature tau")] = 2.0,
    samples: Annotated[int, typer.Option(
        help="distill: Every Expert Matters knowledge augmentation, teacher passes with sampled experts (0: off)")
    ] = 0,
    mode: Annotated[str, typer.Option(help="qat: binary | ternary")] = "ternary",
    list_: Annotated[bool, typer.Option("--list", help="list the methods and exit")] = False,
) -> None:
    """Compress the experts of every MoE layer of RUN with METHOD (prune, merge or decompose) and write the result
    to --out: a run folder (`moekit eval OUT` reads it) for a moekit run, or, for a Hugging Face MoE checkpoint
    (pruning methods), a checkpoint `AutoModelForCausalLM.from_pretrained` loads; with a before/after table."""
    from moekit.compress.methods import TRAINED, list_compressors

    if list_:
        for name, desc in {**list_compressors(), **TRAINED}.items():
            typer.echo(f"{name:10s} {desc}")
        return
    if method is None or run is None or out is None:
        raise ValueError("compress: give METHOD RUN --out DST (or --list)")
    if method in TRAINED:
        _trained(method, run, out, student=student, steps=steps, lr=lr, batch_size=batch_size, alpha=alpha,
                 temperature=temperature, samples=samples, mode=mode, force=force)
        return
    if student is not None:
        raise ValueError(f"compress: --student is for distill, not {method!r}")
    from moekit.hf import is_hf_dir

    if is_hf_dir(run):
        from moekit.compress.hf import compress_hf
        from moekit.compress.prune import list_methods

        if method not in list_methods():
            known = ", ".join(list_methods())
            raise ValueError(f"compress: a Hugging Face checkpoint takes a pruning method ({known}), got "
                             f"{method!r}; merge and decompose work on moekit runs")
        if rank is not None or sparsity:
            raise ValueError("compress: --rank and --sparsity are for mcsmoe / svd on a moekit run")
        if budget != "uniform":
            raise ValueError(f"compress: --budget {budget} needs a moekit run; a Hugging Face config holds one "
                             "expert count for all layers")
        report = compress_hf(method, run, out, ratio=0.25 if ratio is None else ratio, calib=calib,
                             calib_batches=calib_batches, calib_seq_len=calib_seq_len or 256,
                             protect_super_experts=protect_super, evaluate=evaluate, force=force)
    else:
        if calib is not None:
            raise ValueError(f"--calib is for a Hugging Face checkpoint; {run} is a moekit run (it calibrates "
                             "on its own train split)")
        from moekit.compress.run import compress_run

        report = compress_run(method, run, out, ratio=ratio, rank=rank, sparsity=sparsity,
                              calib_batches=calib_batches, calib_seq_len=calib_seq_len,
                              protect_super_experts=protect_super, evaluate=evaluate, force=force, budget=budget)
    typer.echo(report.table())
    typer.echo(f"wrote {out}")


def _trained(method: str, run: Path, out: Path, *, student: Path | None, steps: int, lr: float,
             batch_size: int | None, alpha: float, temperature: float, samples: int, mode: str, force: bool) -> None:
    """`moekit compress distill TEACHER --student STUDENT --out DST` and `moekit compress qat RUN --out DST`."""
    from moekit.compress.finetune import FinetuneConfig

    ft = FinetuneConfig(steps=steps, lr=lr, batch_size=batch_size)
    if method == "distill":
        from moekit.compress.distill import DistillConfig, distill_run

        if student is None:
            raise ValueError("compress distill: give the student run with --student (RUN is the teacher)")
        res = distill_run(run, student, out, distill=DistillConfig(alpha=alpha, temperature=temperature,
                                                                    samples=samples), finetune=ft, force=force,
                          progress=True)
    else:
        from moekit.compress.qat import qat_run

        if student is not None:
            raise ValueError("compress qat: --student is for distill")
        res = qat_run(run, out, mode=mode, finetune=ft, force=force, progress=True)
    if res.final_eval is not None:
        typer.echo(f"validation loss after {res.step} steps: {res.final_eval.loss:.4f}")
    typer.echo(f"wrote {out}")
