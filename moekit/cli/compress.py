"""`moekit compress`: prune, merge (MC-SMoE) or decompose (SVD) the experts of a trained moekit run into a new
run folder, or prune the experts of a Hugging Face MoE checkpoint into a checkpoint transformers loads."""

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
    protect_super: Annotated[bool, typer.Option("--protect-super/--no-protect-super",
                                                help="keep super experts (the analyze rule)")] = True,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="print validation loss before/after")] = True,
    force: Annotated[bool, typer.Option("--force", help="replace an existing --out directory")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the methods and exit")] = False,
) -> None:
    """Compress the experts of every MoE layer of RUN with METHOD (prune, merge or decompose) and write the result
    to --out: a run folder (`moekit eval OUT` reads it) for a moekit run, or, for a Hugging Face MoE checkpoint
    (pruning methods), a checkpoint `AutoModelForCausalLM.from_pretrained` loads; with a before/after table."""
    from moekit.compress.methods import list_compressors

    if list_:
        for name, desc in list_compressors().items():
            typer.echo(f"{name:10s} {desc}")
        return
    if method is None or run is None or out is None:
        raise ValueError("compress: give METHOD RUN --out DST (or --list)")
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
                              protect_super_experts=protect_super, evaluate=evaluate, force=force)
    typer.echo(report.table())
    typer.echo(f"wrote {out}")
