"""The request bodies `moekit serve` accepts: OpenAI `/v1/completions` and `/v1/chat/completions` fields, plus the
`moekit` extension for per-request routing, checked into a `GenRequest`; anything wrong is `RequestError(400)`
naming the field (never a 500).

    {"model": "run", "prompt": "The", "max_tokens": 20, "temperature": 0, "stream": true,
     "moekit": {"disable_experts": {"1": [3, 5]}, "force_experts": {"0": [2]}, "top_p_experts": 0.5}}

`top_p_experts` is a float for every MoE layer or {"layer": p}: dynamic k (`moekit.infer.reroute.dynamic_k`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from moekit.utils.httpserve import RequestError

MOEKIT_KEYS = {"disable_experts", "force_experts", "top_p_experts"}


@dataclass
class GenRequest:
    """A checked request: what to generate and how to route."""

    kind: str  # "completion" | "chat"
    model: str
    prompt: str | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat: [{role, content (text)}]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    echo: bool = False
    disable: dict[int, list[int]] = field(default_factory=dict)
    force: dict[int, list[int]] = field(default_factory=dict)
    top_p_experts: float | dict[int, float] | None = None


def _number(body: dict, key: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RequestError(400, f"'{key}': expected a number, found {json.dumps(v)[:40]}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise RequestError(400, f"'{key}': expected a number in {'(' if lo_open else '['}{lo}, {hi}], found {v}")
    return float(v)


def _layer_lists(v: object, where: str) -> dict[int, list[int]]:
    if not isinstance(v, dict):
        raise RequestError(400, f"{where}: expected an object {{\"LAYER\": [EXPERT, ...]}}")
    out = {}
    for k, experts in v.items():
        if not str(k).isdigit():
            raise RequestError(400, f"{where}: expected layer numbers as keys, found {k!r}")
        if not isinstance(experts, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in experts):
            raise RequestError(400, f"{where}[{k!r}]: expected a list of expert numbers")
        out[int(k)] = list(experts)
    return out


def _moekit_options(v: object, req: GenRequest) -> None:
    if v is None:
        return
    if not isinstance(v, dict):
        raise RequestError(400, "'moekit': expected an object with some of " + ", ".join(sorted(MOEKIT_KEYS)))
    unknown = sorted(set(v) - MOEKIT_KEYS)
    if unknown:
        raise RequestError(400, f"'moekit': unknown fields {unknown}; expected some of {sorted(MOEKIT_KEYS)}")
    if v.get("disable_experts") is not None:
        req.disable = _layer_lists(v["disable_experts"], "'moekit.disable_experts'")
    if v.get("force_experts") is not None:
        req.force = _layer_lists(v["force_experts"], "'moekit.force_experts'")
    p = v.get("top_p_experts")
    if p is None:
        return
    spec = p if isinstance(p, dict) else {"*": p}
    for k, x in spec.items():
        if k != "*" and not str(k).isdigit():
            raise RequestError(400, f"'moekit.top_p_experts': expected layer numbers as keys, found {k!r}")
        if isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x <= 1:
            raise RequestError(400, f"'moekit.top_p_experts': expected a number in (0, 1], found {json.dumps(x)[:40]}")
    req.top_p_experts = float(p) if not isinstance(p, dict) else {int(k): float(x) for k, x in p.items()}


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"{where}[{j}]: expected {{\"type\": \"text\", \"text\": \"...\"}}")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise RequestError(400, f"{where}: expected a string or a list of text parts")


def parse_request(raw: bytes, kind: str, *, max_tokens: int) -> GenRequest:
    """Parse and check a `kind` ("completion" | "chat") body; `max_tokens` is the server's cap and default."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestError(400, "request body: expected UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body: expected a JSON object, found {type(body).__name__}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "'model': expected a non-empty string")
    req = GenRequest(kind=kind, model=model)
    if kind == "completion":
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise RequestError(400, "'prompt': expected a non-empty string")
        req.prompt = p
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError(400, "'echo': expected true or false")
        req.echo = echo
    else:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages': expected a non-empty list of {role, content}")
        req.messages = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, f"'messages[{i}]': expected an object with a string 'role'")
            req.messages.append({"role": m["role"], "content": _text(m.get("content"), f"'messages[{i}].content'")})
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    if mt is None:
        mt = max_tokens
    if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= max_tokens:
        raise RequestError(400, f"'max_tokens': expected an integer in [1, {max_tokens}], found {json.dumps(mt)[:40]}")
    req.max_tokens = mt
    req.temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    req.top_p = _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise RequestError(400, f"'seed': expected an integer >= 0, found {json.dumps(seed)[:40]}")
    req.seed = seed
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream': expected true or false")
    req.stream = stream
    if body.get("n", 1) != 1:
        raise RequestError(400, "'n': only 1 choice per request is supported")
    for unsupported in ("stop", "logprobs", "tools", "functions"):
        if body.get(unsupported) not in (None, False, []):
            raise RequestError(400, f"'{unsupported}': not supported by moekit serve")
    _moekit_options(body.get("moekit"), req)
    return req


__all__ = ["GenRequest", "MOEKIT_KEYS", "parse_request"]
