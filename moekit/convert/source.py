"""The dense model a conversion starts from: a moekit dense LM (a model, or a run/checkpoint folder) or a
Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoint (`moekit.convert.hf_dense`), checked to be what every
method here needs: no experts yet, and a gated (SwiGLU-style) feed-forward in every block."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.layers import MLP
from moekit.models import MoELM


@dataclass
class DenseSource:
    """A dense LM to convert and where it came from."""

    model: MoELM  # the dense moekit LM (num_experts = 0)
    origin: str  # what it was read from, for the summary ("moekit run RUN", "transformers llama at DIR", "model")
    meta: dict[str, Any] = field(default_factory=dict)  # the source checkpoint's config.json minus "model" ({} if none)
    run_dir: Path | None = None  # the moekit run folder (its tokenizer.json is copied along), None otherwise


def check_dense(model: MoELM, who: str = "convert") -> None:
    """Raise ValueError unless every block of `model` has a dense gated feed-forward (`MLP(gated=True)`)."""
    if not isinstance(model, MoELM):
        raise ValueError(f"{who}: expected a moekit MoELM, got {type(model).__name__}")
    if model.config.num_experts:
        raise ValueError(
            f"{who}: the source already has experts (num_experts={model.config.num_experts}); give a dense model"
        )
    for i, block in enumerate(model.layers):
        mlp = block.mlp
        if not isinstance(mlp, MLP):
            raise ValueError(f"{who}: block {i}'s feed-forward is {type(mlp).__name__}, expected a dense MLP")
        if not mlp.gated:
            raise ValueError(
                f"{who}: block {i}'s feed-forward is not gated (up/down only); the methods need a gated "
                "(gate_proj, up_proj, down_proj) FFN, whose gate and up rows make the experts' gate_up_proj"
            )


def load_dense(src: str | Path | MoELM) -> DenseSource:
    """A `DenseSource` from a dense MoELM, a moekit run or checkpoint folder, or a transformers checkpoint
    folder (a config.json with a `model_type`); raises ValueError naming what is not dense or not gated."""
    if isinstance(src, MoELM):
        check_dense(src)
        return DenseSource(src, "model")
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    from moekit.convert.hf_dense import is_hf_folder, load_hf_dense

    if is_hf_folder(path):
        model, model_type = load_hf_dense(path)
        return DenseSource(model, f"transformers {model_type} at {path}")
    from moekit.train.checkpoint import CKPT, checkpoint_dir, load_model, read_meta

    ckpt = checkpoint_dir(path)
    model = load_model(ckpt)
    check_dense(model)
    run_dir = ckpt.parent if ckpt.name == CKPT else None
    meta = {k: v for k, v in read_meta(ckpt).items() if k != "model"}
    return DenseSource(model, f"moekit checkpoint {ckpt}", meta, run_dir)
