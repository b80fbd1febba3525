"""`moekit compress`: prune the experts of a trained moekit run into a new run folder, or of a Hugging Face
MoE checkpoint into a checkpoint transformers loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def compress(
    method: Annotated[str | None, typer.Argument(help="pruning method (see --list)")] = None,
    run: Annotated[Path | None, typer.Argument(
        help="run directory written by `moekit train`, or a Hugging Face checkpoint directory")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="new run (or Hugging Face checkpoint) directory")] = None,
    ratio: Annotated[float, typer.Option(help="fraction of experts removed per MoE layer, in (0, 1)")] = 0.25,
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
    """Prune METHOD's choice of experts from every MoE layer of RUN (a moekit run, or a Hugging Face MoE
    checkpoint) and write the result to --out (a run folder `moekit eval OUT` reads, or a checkpoint
    `AutoModelForCausalLM.from_pretrained` loads), with a before/after table."""
    from moekit.compress.prune import list_methods

    if list_:
        for name, desc in list_methods().items():
            typer.echo(f"{name:10s} {desc}")
        return
    if method is None or run is None or out is None:
        raise ValueError("compress: give METHOD RUN --out DST (or --list)")
    from moekit.hf import is_hf_dir

    if is_hf_dir(run):
        from moekit.compress.hf import compress_hf

        report = compress_hf(method, run, out, ratio=ratio, calib=calib, calib_batches=calib_batches,
                             calib_seq_len=calib_seq_len or 256, protect_super_experts=protect_super,
                             evaluate=evaluate, force=force)
    else:
        if calib is not None:
            raise ValueError(f"--calib is for a Hugging Face checkpoint; {run} is a moekit run (it calibrates "
                             "on its own train split)")
        from moekit.compress.run import compress_run

        report = compress_run(method, run, out, ratio=ratio, calib_batches=calib_batches,
                              calib_seq_len=calib_seq_len, protect_super_experts=protect_super, evaluate=evaluate,
                              force=force)
    typer.echo(report.table())
    typer.echo(f"wrote {out}")
