"""Checkpoints: safetensors weights + config.json + trainer state, written atomically.

Layout of a run directory:
    RUN/checkpoint/model.safetensors   weights (tied tensors stored once)
    RUN/checkpoint/config.json         {"model": LMConfig, "train": TrainConfig, "data": {...}, "step": n}
    RUN/checkpoint/trainer_state.pt    optimiser state, RNG states, step (tensors and numbers only;
                                       loaded with torch.load(weights_only=True))
Writing (`save_checkpoint`): the new folder is written as RUN/.checkpoint-XXXX, then swapped in by two
renames (`moekit.utils.io.replace_dir`): checkpoint -> checkpoint.old, .checkpoint-XXXX -> checkpoint, and
checkpoint.old is deleted. Killed at any point, the run folder still holds one whole checkpoint, at
`checkpoint` or (between the renames) at `checkpoint.old`. Readers fall back to `checkpoint.old`, and
`recover_run` (run by training at start, and by any reader that finds leftovers and no live writer) puts it
back and removes the stale `.checkpoint-*` temp folders. Loading never executes code from the checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moekit.models import LMConfig, MoELM
from moekit.utils.io import folder_lock, old_dir, recover_dir, replace_dir
from moekit.utils.readers import load_safetensors, load_torch_state, read_json_object

CKPT = "checkpoint"
TMP_PREFIX = ".checkpoint-"  # temporary folders of writes in progress (or killed): RUN/.checkpoint-XXXX


def save_checkpoint(run_dir: str | Path, model: MoELM, meta: dict[str, Any], trainer_state: dict | None = None) -> Path:
    """Write RUN/checkpoint atomically; `meta` goes to config.json beside the model config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=TMP_PREFIX))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}  # device-independent
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"model": model.config.to_dict(), **meta}, indent=2, sort_keys=True))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    final = run_dir / CKPT
    replace_dir(tmp, final)
    return final


def _is_complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run folder holds a checkpoint (at `checkpoint`, or at `checkpoint.old` after a killed write)."""
    run_dir = Path(run_dir)
    return _is_complete(run_dir / CKPT) or _is_complete(old_dir(run_dir / CKPT))


def recover_run(run_dir: str | Path) -> None:
    """Put a run folder left by a killed checkpoint write back in order: `checkpoint.old` is renamed back when
    `checkpoint` is missing (dropped when both exist), and `.checkpoint-*` temp folders are removed.
    Nothing else is touched. Call it only while no other process writes to the folder (`folder_lock`)."""
    run_dir = Path(run_dir)
    recover_dir(run_dir / CKPT)
    for tmp in run_dir.glob(TMP_PREFIX + "*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)


def _recover_if_idle(run_dir: Path) -> None:
    """recover_run when a killed write left something behind and no process holds the run (a live writer's
    temp folder is not stale). A folder that cannot be changed (read-only) is left as it is."""
    if not old_dir(run_dir / CKPT).exists() and not any(run_dir.glob(TMP_PREFIX + "*")):
        return
    try:
        with folder_lock(run_dir) as held:
            if held:
                recover_run(run_dir)
    except OSError:
        pass


def checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory or its checkpoint folder; fail clearly when neither holds a checkpoint.

    Leftovers of a killed write in a run directory are cleaned first (see `recover_run`)."""
    path = Path(path)
    if path.is_dir():
        _recover_if_idle(path)
    for cand in (path / CKPT, old_dir(path / CKPT), path):
        if _is_complete(cand):
            return cand
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raise FileNotFoundError(
        f"no moekit checkpoint in {path} (expected {path / CKPT}/model.safetensors and config.json)"
    )


def read_meta(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint (a JSON object with a "model" object); errors name the file."""
    f = checkpoint_dir(path) / "config.json"
    meta = read_json_object(f)
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{f}: expected a \"model\" object (the model config), found {meta.get('model')!r:.60}")
    return meta


def read_model_config(path: str | Path) -> LMConfig:
    """The LMConfig in a checkpoint's config.json (no weights are read); a bad one is ValueError naming the file."""
    ckpt = checkpoint_dir(path)
    meta = read_meta(ckpt)
    try:
        return LMConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ckpt / 'config.json'}: bad model config: {e}") from e


def load_model(path: str | Path, *, map_location: str = "cpu") -> MoELM:
    """Rebuild the model from config.json and load its weights; tensors must match the config exactly."""
    ckpt = checkpoint_dir(path)
    cfg = read_model_config(ckpt)
    model = MoELM(cfg)
    state = load_safetensors(ckpt / "model.safetensors", device=map_location)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}")
        if wrong:
            details.append(
                "wrong shapes "
                + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong[:5])
            )
        raise ValueError(f"checkpoint {ckpt} does not match its config: " + "; ".join(details))
    model.load_state_dict(state)
    return model


def load_trainer_state(path: str | Path) -> dict | None:
    """Optimiser/RNG state of a checkpoint (None when absent). Tensors and plain data only."""
    f = checkpoint_dir(path) / "trainer_state.pt"
    return load_torch_state(f) if f.is_file() else None
