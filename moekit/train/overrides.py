"""`--set key=value` overrides for model, train and data configs (values parsed as JSON when they can be)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union


def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true' -> True, 'null' -> None, '{"k": 2}' -> dict, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, None, unions, list, dict, Any)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    return not isinstance(tp, type) or isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def _field_types(cfg: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(cfg))


def _args_field(cfg: Any, name: str) -> str | None:
    """`router` -> `router_args` when the config has both: a registered name and that part's arguments."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return f"{name}_args" if f"{name}_args" in names and name in names else None


def apply_overrides(configs: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """Apply KEY=VALUE pairs to whichever config (a dataclass) has field KEY; `router_args.k=2` sets one
    entry of a dict field; `train.lr=...` picks the config explicitly. Returns new configs; an unknown
    key lists every valid one, a value of the wrong type names the field and the expected type.

    A part chosen by name with its own arguments (`router` + `router_args`, `experts` + `experts_args`):
    when `--set router=X` changes the router, its arguments start from X's defaults (empty), whatever the
    order of the pairs, and `router_args.*` pairs apply on top; the previous router's arguments never
    carry over to another router."""
    parsed = []
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        parsed.append((key, *_locate(configs, key), parse_value(raw)))
    out = dict(configs)
    # names of parts first: a changed name resets its arguments before any `NAME_args...` pair applies
    firsts = [p for p in parsed if not p[3] and _args_field(out[p[1]], p[2])]
    for key, target, top, sub, value in firsts + [p for p in parsed if p not in firsts]:
        cfg = out[target]
        hint = _field_types(cfg)[top]
        if sub:
            current = getattr(cfg, top)
            if not isinstance(current, dict):
                raise ValueError(f"--set {key}: {target}.{top} is not a dict")
            value = {**current, sub: value}
        elif not _matches(value, hint):
            raise ValueError(
                f"--set {key}: {target}.{top} expects {_type_name(hint)}, found {value!r} ({type(value).__name__})"
            )
        changes = {top: value}
        args = _args_field(cfg, top)
        if args is not None and value != getattr(cfg, top):
            changes[args] = {}
        out[target] = dataclasses.replace(cfg, **changes)
    return out


def _locate(configs: dict[str, Any], key: str) -> tuple[str, str, str]:
    """(config name, field, sub-key of a dict field or '') for KEY; an unknown key lists the valid ones."""
    scope, _, rest = key.partition(".")
    names = [scope] if scope in configs and rest else list(configs)
    field_path = rest if scope in configs and rest else key
    top, _, sub = field_path.partition(".")
    target = next((n for n in names if top in {f.name for f in dataclasses.fields(configs[n])}), None)
    if target is None:
        valid = sorted(f"{n}.{f.name}" for n, c in configs.items() for f in dataclasses.fields(c))
        raise ValueError(f"--set {key}: no such config field; valid fields: {', '.join(valid)}")
    return target, top, sub
