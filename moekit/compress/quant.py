"""Weight-only, group-wise symmetric quantization of routed experts, stored in the compressed-tensors format.

What is quantized: the routed experts' matrices of every MoE layer (`Experts.gate_up_proj [E, 2F, D]` or
`up_proj [E, F, D]`, and `down_proj [E, D, F]`), each expert's matrix like one `nn.Linear` weight [out, in],
with one scale per `group_size` consecutive input columns. Routers, attention, embeddings, norms and shared
experts stay in full precision.

Storage is real low-bit, in compressed-tensors' own per-module layout (the library does the quantize, pack and
unpack; https://github.com/neuralmagic/compressed-tensors):
- 8 bits: "naive-quantized": `weight` int8 [N, K] + `weight_scale` [N, K / group_size];
- 4 bits (any of 2..7): "pack-quantized": `weight_packed` int32 [N, ceil(K * bits / 32)] (8 int4 per int32)
  + `weight_scale` + `weight_shape` int64 [2].
State-dict keys read `layers.{i}.mlp.experts.{e}.gate_up_proj.weight_packed`, the way llm-compressor names
per-expert Linear modules. The forward pass dequantizes each routed expert's two matrices on the fly (no
CPU low-bit matmul kernel is used: compressed-tensors has none, see docs/compress.md, 'Quantized experts').

Per-expert bit-widths (the hook for calibration sensitivity): `expert_bits={(layer, expert): bits}`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.activations import get_activation
from moekit.layers.experts import Experts, check_input_dtype
from moekit.routing.routing import Routing
from moekit.utils.deps import require

__all__ = [
    "SUPPORTED_BITS", "QuantizedExpert", "QuantizedExperts", "QuantizedWeight", "check_quant_args",
    "experts_nbytes", "load_quantized", "quantization_config", "quantize_experts", "quantize_layer",
    "save_quantized", "scheme",
]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
CKPT = "checkpoint"
TMP_PREFIX = ".checkpoint-"


def _ct() -> Any:
    """The compressed_tensors package (optional: `pip install 'moekit[compress]'`)."""
    return require("compressed_tensors")


def check_quant_args(bits: int, group_size: int) -> None:
    """ValueError naming the bad argument and the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"quantize_experts: bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quantize_experts: group_size must be a positive int, got {group_size!r}")


def scheme(bits: int, group_size: int, targets: list[str] | None = None) -> Any:
    """The compressed-tensors QuantizationScheme of weight-only symmetric int `bits`, groups of `group_size`."""
    q = _ct().quantization
    args = q.QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
    return q.QuantizationScheme(targets=targets or ["Linear"], weights=args, format=fmt(bits))


def fmt(bits: int) -> str:
    """compressed-tensors format of a bit-width: int8 as plain int8 tensors, fewer bits packed into int32."""
    return "naive-quantized" if bits == 8 else "pack-quantized"


def _compressor(bits: int) -> Any:
    c = _ct().compressors
    return c.NaiveQuantizationCompressor if bits == 8 else c.PackedQuantizationCompressor


class QuantizedWeight(nn.Module):
    """One [N, K] matrix quantized: int8 `weight` (8 bits) or int32 `weight_packed` + `weight_shape` (fewer),
    and `weight_scale [N, K / group_size]` in the original float dtype. `dequantize()` -> [N, K]."""

    def __init__(self, *, shape: tuple[int, int], bits: int, group_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_quant_args(bits, group_size)
        N, K = shape
        if K % group_size:
            raise ValueError(
                f"quantize_experts: group_size {group_size} must divide the input width of every expert matrix; "
                f"found width {K} (use a divisor of {K}; no padding is done)"
            )
        self.bits, self.group_size, self.shape, self.dtype = bits, group_size, (N, K), dtype
        self._scheme = scheme(bits, group_size)  # built once: dequantize runs in every forward
        if bits == 8:
            self.register_buffer("weight", torch.zeros(N, K, dtype=torch.int8))
        else:
            self.register_buffer("weight_packed", torch.zeros(N, -(-K * bits // 32), dtype=torch.int32))
            self.register_buffer("weight_shape", torch.tensor([N, K]))
        self.register_buffer("weight_scale", torch.ones(N, K // group_size, dtype=dtype))

    @classmethod
    def from_float(cls, w: Tensor, *, bits: int, group_size: int) -> QuantizedWeight:
        """Quantize w [N, K]: per group scale = max|w| / (2^(bits-1) - 1/2) (compressed-tensors' symmetric
        rule), q = clamp(round(w / scale)); |w - q * scale| <= scale / 2 for every element."""
        N, K = w.shape
        new = cls(shape=(N, K), bits=bits, group_size=group_size, dtype=w.dtype)
        w = w.detach()
        absmax = w.reshape(N, K // group_size, group_size).abs().amax(-1)  # [N, G]
        absmax = absmax.clamp_min(torch.finfo(w.dtype).tiny)  # an all-zero group: scale > 0, q = 0
        s = new._scheme
        scale, zp = _ct().quantization.utils.calculate_qparams(-absmax, absmax, s.weights)
        out = _compressor(bits).compress({"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}, s)
        for name, t in out.items():
            getattr(new, name).copy_(t)
        return new

    def dequantize(self) -> Tensor:
        """[N, K] in the scale's dtype."""
        state = {name: b for name, b in self.named_buffers(recurse=False)}
        return _compressor(self.bits).decompress(state, self._scheme)["weight"].to(self.weight_scale.dtype)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (packed values and scales; the 16-byte shape included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))


class QuantizedExpert(nn.Module):
    """One expert's quantized matrices: `gate_up_proj` [2F, D] (or `up_proj` [F, D]) and `down_proj` [D, F]."""

    def __init__(self, mats: dict[str, QuantizedWeight]) -> None:
        super().__init__()
        for name, m in mats.items():
            self.add_module(name, m)


class QuantizedExperts(nn.Module):
    """Drop-in for `Experts` (same forward contract) holding each expert's weights quantized: submodules
    "0".."E-1", each a `QuantizedExpert`. forward(x [T, D], routing) -> [T, D], dequantizing only the experts
    some token is routed to, one at a time. Inference only (no gradients reach the integer weights)."""

    def __init__(self, *, config: dict[str, Any], experts: list[QuantizedExpert], dtype: torch.dtype) -> None:
        super().__init__()
        self.cfg = dict(config)
        self.num_experts, self.dim, self.hidden = config["num_experts"], config["dim"], config["hidden"]
        self.gated = config.get("gated", True)
        self.expert_offset = config.get("expert_offset", 0)
        self.act = get_activation(config.get("activation", "silu"), **(config.get("activation_args") or {}))
        self._dtype = dtype
        for e, ex in enumerate(experts):
            self.add_module(str(e), ex)

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype the input must have: the original weights' (the scales keep it)."""
        return self._dtype

    @property
    def num_local_experts(self) -> int:
        return len(self._modules)

    def expert(self, e: int) -> QuantizedExpert:
        """Local expert e's quantized matrices."""
        return self._modules[str(e)]  # type: ignore[return-value]

    def first_name(self) -> str:
        return "gate_up_proj" if self.gated else "up_proj"

    def dequantize(self) -> dict[str, Tensor]:
        """The float weights in `Experts`' layout: {"gate_up_proj" or "up_proj": [E, ., D], "down_proj": [E, D, F]}."""
        names = (self.first_name(), "down_proj")
        return {n: torch.stack([getattr(self.expert(e), n).dequantize() for e in range(self.num_local_experts)])
                for n in names}

    def nbytes(self) -> int:
        """Bytes of all quantized tensors of this layer (values, scales, shapes)."""
        return sum(m.nbytes() for m in self.modules() if isinstance(m, QuantizedWeight))

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        """x: [T, D], routing with expert_ids/weights [T, k] -> [T, D] = sum over slots of weight * expert(x),
        each used expert's matrices dequantized just before its matmuls."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"QuantizedExperts: expected input [T, {self.dim}], got {tuple(x.shape)}")
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"QuantizedExperts: routing is over {routing.num_experts} experts but this layer has {self.num_experts}"
            )
        check_input_dtype("QuantizedExperts", x, self._dtype)
        out = torch.zeros_like(x)
        ids = routing.expert_ids - self.expert_offset  # [T, k] local ids
        first = self.first_name()
        for e in torch.unique(ids).tolist():
            if e < 0 or e >= self.num_local_experts:
                continue  # empty slot (-1) or an expert another shard holds
            tok, slot = (ids == e).nonzero(as_tuple=True)
            ex = self.expert(e)
            h = x[tok] @ getattr(ex, first).dequantize().T  # [n, D] x [D, 2F] -> [n, 2F]
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                h = self.act.glu(gate, up)
            else:
                h = self.act(h)
            y = h @ ex.down_proj.dequantize().T  # [n, F] x [F, D] -> [n, D]
            out.index_add_(0, tok, y * routing.weights[tok, slot, None].to(y.dtype))
        return out


def _moe_experts(model: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
    """(layer index, module name, experts module) of each MoE layer of a moekit MoELM."""
    for i, block in enumerate(model.layers):
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, Experts | QuantizedExperts):
            yield i, f"layers.{i}.mlp.experts", experts


def quantize_layer(experts: Experts, bits: int | Mapping[int, int], group_size: int) -> QuantizedExperts:
    """A QuantizedExperts holding `experts`' weights; bits: one width, or local expert id -> width."""
    if not isinstance(experts, Experts):
        raise TypeError(f"quantize_layer: expected moekit Experts, found {type(experts).__name__}")
    first = "gate_up_proj" if experts.gated else "up_proj"
    out = []
    for e in range(experts.num_local_experts):
        b = bits if isinstance(bits, int) else bits[e]
        mats = {n: QuantizedWeight.from_float(getattr(experts, n)[e], bits=b, group_size=group_size)
                for n in (first, "down_proj")}
        out.append(QuantizedExpert(mats))
    cfg = {**experts.config(), "num_local_experts": experts.num_local_experts}
    return QuantizedExperts(config=cfg, experts=out, dtype=experts.weight_dtype)


def quantize_experts(
    model: nn.Module,
    bits: int = 8,
    group_size: int = 128,
    *,
    keep: tuple[str, ...] = ("router", "shared"),
    expert_bits: Mapping[tuple[int, int], int] | None = None,
) -> nn.Module:
    """Quantize the routed experts of a moekit MoELM in place (and return it): weight-only, symmetric,
    group-wise, `bits` per weight (8, or 2..7 packed into int32), one scale per `group_size` input columns.

    keep: parts left in full precision; routers and shared experts always are (only routed experts are
    quantized), so it must include both; it exists so a later method may quantize more.
    expert_bits: {(layer, expert): bits} overriding `bits` for single experts (e.g. from calibration
    sensitivity). group_size must divide D and F (no padding); errors name the field.
    """
    check_quant_args(bits, group_size)
    if not {"router", "shared"} <= set(keep):
        raise ValueError(f"quantize_experts: only routed experts can be quantized; keep must include "
                         f"'router' and 'shared', got {keep!r}")
    expert_bits = dict(expert_bits or {})
    for b in expert_bits.values():
        check_quant_args(b, group_size)
    layers = list(_moe_experts(model))
    if not layers:
        raise ValueError("quantize_experts: the model has no MoE layer with moekit Experts")
    known = {(i, e) for i, _, ex in layers for e in range(ex.num_local_experts)}
    unknown = sorted(set(expert_bits) - known)
    if unknown:
        raise ValueError(f"quantize_experts: expert_bits names experts the model does not have: {unknown[:5]}")
    for i, _, ex in layers:
        if isinstance(ex, QuantizedExperts):
            raise ValueError(f"quantize_experts: layer {i}'s experts are already quantized")
        for name, w in ((n, getattr(ex, n)) for n in ("gate_up_proj", "up_proj", "down_proj") if hasattr(ex, n)):
            if w.shape[-1] % group_size:
                raise ValueError(
                    f"quantize_experts: group_size {group_size} must divide the input width of every expert "
                    f"matrix; layer {i} {name} has width {w.shape[-1]} (no padding is done)"
                )
    for i, _, ex in layers:
        per = {e: expert_bits.get((i, e), bits) for e in range(ex.num_local_experts)}
        model.layers[i].mlp.experts = quantize_layer(ex, per, group_size)
    return model


def experts_nbytes(model: nn.Module) -> int:
    """Bytes held by the routed experts of all MoE layers (float or quantized)."""
    total = 0
    for _, _, ex in _moe_experts(model):
        if isinstance(ex, QuantizedExperts):
            total += ex.nbytes()
        else:
            total += sum(p.numel() * p.element_size() for p in ex.parameters(recurse=False))
    return total


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The `quantization_config` of a quantized model as llm-compressor writes it into config.json: one
    config group per bit-width, targeting the quantized matrices by module name; everything else ignored."""
    ct = _ct()
    groups: dict[tuple[int, int], list[str]] = {}
    for _, name, ex in _moe_experts(model):
        if not isinstance(ex, QuantizedExperts):
            raise ValueError(f"quantization_config: {name} is not quantized (run quantize_experts first)")
        for e in range(ex.num_local_experts):
            for n, m in ex.expert(e).named_children():
                groups.setdefault((m.bits, m.group_size), []).append(f"{name}.{e}.{n}")
    config_groups = {
        f"group_{j}": scheme(b, g, targets) for j, ((b, g), targets) in enumerate(sorted(groups.items()))
    }
    formats = {fmt(b) for b, _ in groups}
    cfg = ct.quantization.QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    return json.loads(cfg.model_dump_json())


def save_quantized(model: nn.Module, out: str | Path) -> Path:
    """Write OUT/checkpoint/{model.safetensors, config.json} (config.json: {"model": LMConfig,
    "quantization_config": ...}), atomically: written to OUT/.checkpoint-XXXX and renamed into place; on any
    failure the temporary folder is removed (and OUT too, when this call created it)."""
    from safetensors.torch import save_file

    from moekit.utils.io import replace_dir

    qcfg = quantization_config(model)  # fails before anything is written
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {"model": model.config.to_dict(), "quantization_config": qcfg}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        replace_dir(tmp, out / CKPT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out / CKPT


def _bits_by_module(qcfg: dict[str, Any], where: Path) -> dict[str, tuple[int, int]]:
    """module name -> (bits, group_size) from a quantization_config's config groups."""
    try:
        out = {}
        for group in qcfg["config_groups"].values():
            w = group["weights"]
            for t in group["targets"]:
                out[t] = (int(w["num_bits"]), int(w["group_size"]))
        return out
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad quantization_config ({e!r}); expected config_groups with targets and "
                         "weights.num_bits / group_size, as save_quantized writes") from e


def load_quantized(path: str | Path) -> nn.Module:
    """Load what `save_quantized` wrote (OUT or OUT/checkpoint): a MoELM whose routed experts are
    QuantizedExperts; tensors must match the config exactly. No code from the checkpoint runs."""
    from moekit.models import MoELM
    from moekit.train.checkpoint import checkpoint_dir, read_meta, read_model_config
    from moekit.utils.readers import load_safetensors

    ckpt = checkpoint_dir(path)
    meta = read_meta(ckpt)
    if not isinstance(meta.get("quantization_config"), dict):
        raise ValueError(f"{ckpt / 'config.json'}: no quantization_config (not written by save_quantized)")
    per_module = _bits_by_module(meta["quantization_config"], ckpt / "config.json")
    cfg = read_model_config(ckpt)
    model = MoELM(cfg)
    for i, name, ex in list(_moe_experts(model)):
        model.layers[i].mlp.experts = quantized_like(ex, name, per_module, ckpt / "config.json")
    state = load_safetensors(ckpt / "model.safetensors")
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return load_checked(model, state, ckpt)


def quantized_like(ex: nn.Module, name: str, per_module: Mapping[str, tuple[int, int]], where: Path
                   ) -> QuantizedExperts:
    """Empty `QuantizedExperts` shaped like the fused experts `ex` (module path `name`), each matrix at the bits and
    group size `per_module` names for it (`<name>.<e>.<matrix>` -> (bits, group)); `where` names the config file
    in the error when one is missing. The packed tensors come from the checkpoint's state dict afterwards."""
    first = "gate_up_proj" if ex.gated else "up_proj"
    experts = []
    for e in range(ex.num_local_experts):
        mats = {}
        for n in (first, "down_proj"):
            key = f"{name}.{e}.{n}"
            if key not in per_module:
                raise ValueError(f"{where}: quantization_config has no group for {key}")
            b, g = per_module[key]
            mats[n] = QuantizedWeight(shape=tuple(getattr(ex, n).shape[1:]), bits=b, group_size=g,
                                      dtype=ex.weight_dtype)
        experts.append(QuantizedExpert(mats))
    cfg = {**ex.config(), "num_local_experts": ex.num_local_experts}
    return QuantizedExperts(config=cfg, experts=experts, dtype=ex.weight_dtype)


def load_checked(model: nn.Module, state: dict[str, Tensor], path: Path) -> nn.Module:
    """Load `state` into `model` after checking names, shapes and dtypes match exactly (an error names the first
    few that differ); returns the model in eval mode."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected)
                   if state[k].shape != expected[k].shape or state[k].dtype != expected[k].dtype)
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shape or dtype {wrong[:5]}")
    model.load_state_dict(state)
    return model.eval()
