"""`moekit inspect`: layers, experts, total and active parameters of a moekit run directory or of a
Hugging Face checkpoint directory (read without loading the weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def inspect(
    path: Annotated[
        Path, typer.Argument(help="run directory (or its checkpoint folder), or a Hugging Face checkpoint")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Describe a checkpoint without loading its weights."""
    from moekit.hf.inspect import is_hf_dir

    if is_hf_dir(path):
        _inspect_hf(path, as_json)
        return
    from moekit.models import count_params
    from moekit.train import read_meta
    from moekit.train.checkpoint import checkpoint_dir, read_model_config
    from moekit.train.evaluate import measured_experts_per_token
    from moekit.utils.readers import check_safetensors

    meta = read_meta(path)
    cfg = read_model_config(path)
    check_safetensors(checkpoint_dir(path) / "model.safetensors")  # the header only, no tensor data
    measured = measured_experts_per_token(path if (path / "eval.jsonl").is_file() else path.parent)
    pc = count_params(cfg, measured[1] if measured else None)
    layers = [
        ("moe" if cfg.is_moe_layer(i) else "dense") + (f"+mod {cfg.mod_capacity:g}" if cfg.is_depth_layer(i) else "")
        for i in range(cfg.n_layers)
    ]
    info = {
        "path": str(path),
        "step": meta.get("step"),
        "layers": layers,
        "num_experts": cfg.num_experts,
        "router": cfg.router if cfg.num_experts else None,
        "router_args": cfg.router_args if cfg.num_experts else None,
        "shared_experts": cfg.num_shared_experts,
        "expert_hidden": cfg.expert_hidden,
        "dim": cfg.dim,
        "vocab_size": cfg.vocab_size,
        "experts_per_token": measured[1] if measured else None,  # measured on validation, at this step
        "experts_per_token_step": measured[0] if measured else None,
        **pc.as_dict(),
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{path}  (step {info['step']})")
    typer.echo(
        f"  blocks: {cfg.n_layers} ({', '.join(layers)}), width {cfg.dim}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv"
    )
    if cfg.num_experts:
        typer.echo(
            f"  experts: {cfg.num_experts} x width {cfg.expert_hidden}"
            + (f" ({cfg.experts} {cfg.experts_args or ''})".replace(" )", ")") if cfg.experts != "ffn" else "")
            + f", router {cfg.router} {cfg.router_args}, shared experts {cfg.num_shared_experts}"
        )
        if measured:
            typer.echo(
                f"  experts per token: {measured[1]:.2f} measured on validation at step {measured[0]}"
                + (" (varies by token)" if pc.variable_k else "")
            )
        elif pc.variable_k:
            typer.echo(
                "  experts per token: varies by token, not measured yet (no validation in eval.jsonl): the active "
                "counts below use the router's bound"
            )
    else:
        typer.echo(f"  dense FFN width {cfg.ffn_hidden}")
    typer.echo(
        f"  parameters: {pc.total:,} total, {pc.active:,} active per token "
        f"(experts {pc.experts_total:,} total, {pc.experts_active:,} active)"
    )
    mod = " (mixture-of-depths blocks counted in full)" if cfg.mod_capacity < 1 else ""
    typer.echo(f"  forward FLOPs per token: {pc.flops_per_token:,}{mod}")


def _inspect_hf(path: Path, as_json: bool) -> None:
    from moekit.hf.inspect import describe

    info = describe(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    fam = f"moekit.hf family {info['family']}" if info["family"] else "not patchable by moekit.hf"
    typer.echo(f"{path}  (Hugging Face {info['model_type']}, {fam})")
    layers = info["layers"]
    n_moe, n_dense = layers.count("moe"), layers.count("dense")
    typer.echo(f"  blocks: {len(layers)} ({n_moe} moe, {n_dense} dense), width {info['dim']}")
    if info["num_experts"]:
        bpe = info["bytes_per_expert"]
        bpe_s = f"{bpe:,} bytes per expert" if isinstance(bpe, int) else f"bytes per expert by layer {bpe}"
        typer.echo(f"  experts: {info['num_experts']} per layer, top-{info['top_k']}, {bpe_s}")
    typer.echo(
        f"  parameters: {info['total']:,} total, {info['active']:,} active per token "
        f"(experts {info['experts_total']:,} total, {info['experts_active']:,} active)"
    )
    buffers = f", buffers of {info['buffers']:,} elements included" if info["buffers"] else ""
    typer.echo(
        f"  weights: {info['bytes_total']:,} bytes in {info['tensors']} tensors ({', '.join(info['dtypes'])}{buffers})"
    )
