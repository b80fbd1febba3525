"""`--set key=value` overrides for model, train and data configs (values parsed as JSON when they can be)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'null' -> None, '{"k": 2}' -> dict, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(configs: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """Apply KEY=VALUE pairs to whichever config (a dataclass) has field KEY; `router_args.k=2` sets one
    entry of a dict field; `train.lr=...` picks the config explicitly. Returns new configs; an unknown
    key lists every valid one."""
    out = dict(configs)
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        value = parse_value(raw)
        scope, _, rest = key.partition(".")
        names = [scope] if scope in out and rest else list(out)
        field_path = rest if scope in out and rest else key
        top, _, sub = field_path.partition(".")
        target = next((n for n in names if top in {f.name for f in dataclasses.fields(out[n])}), None)
        if target is None:
            valid = sorted(f"{n}.{f.name}" for n, c in out.items() for f in dataclasses.fields(c))
            raise ValueError(f"--set {key}: no such config field; valid fields: {', '.join(valid)}")
        cfg = out[target]
        if sub:
            current = getattr(cfg, top)
            if not isinstance(current, dict):
                raise ValueError(f"--set {key}: {target}.{top} is not a dict")
            value = {**current, sub: value}
        out[target] = dataclasses.replace(cfg, **{top: value})
    return out
