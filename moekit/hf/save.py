"""Save a (patched) transformers model so that `AutoModelForCausalLM.from_pretrained` loads it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from moekit.hf.patch import config_updates
from moekit.utils.deps import require


def save(model: nn.Module, directory: str | Path, **save_kwargs: Any) -> Path:
    """Write `model` (patched or not) as a transformers checkpoint in `directory`.

    The patched layers hold the transformers parameter names, so the weights are written by the
    model's own `save_pretrained` (in the family's hub layout). The config is updated where the
    experts changed (e.g. by `moekit.layers.keep_experts` / `merge_experts` / `add_experts`): expert
    count, top-k and the family's routing fields (`config_updates`).
    Raises `NotExpressible` with the reason, writing nothing, when the family's transformers code
    cannot reproduce the patched routing (e.g. a swapped router).
    """
    require("transformers")
    updates = config_updates(model)  # raises before anything is written
    directory = Path(directory)
    model.save_pretrained(str(directory), **save_kwargs)
    if updates:
        config = copy.deepcopy(model.config)
        target = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key, value in updates.items():
            setattr(target, key, value)
        config.save_pretrained(str(directory))
    return directory
