"""Routing traces: every MoE layer's decisions for every token, recorded by forward hooks and
streamed to Parquet in chunks (DESIGN.md contract 6).

One row per token-slot: layer, seq, pos, token, slot, expert (-1 = empty slot), weight, the router's
top-1 probability and entropy (softmax of its logits), optionally the largest |output| of the expert
on that token (`out_absmax`, for super experts), and label columns (e.g. `label` = domain).
Hooks work on anything built from moekit's `MoE` layer: moekit's LM and patched Hugging Face models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from moekit.layers.dispatch import _first_matrix, plan
from moekit.layers.fused_mlp import fused_expert_mlp
from moekit.layers.moe import MoE
from moekit.routing.routing import Routing
from moekit.utils.deps import require

COLUMNS = ("layer", "seq", "pos", "token", "slot", "expert", "weight", "p_top1", "entropy", "out_absmax")


def moe_layers(model: nn.Module) -> list[tuple[int, str, MoE]]:
    """(layer index, module name, module) of every moekit MoE layer, in model order. The index is the
    number after `layers.` in the name (the transformer block), else the ordinal. A patched Hugging Face
    block (`moekit.hf.PatchedMoE`) keeps its MoE in a plain attribute `moe`, found here too."""
    found = []
    for name, mod in model.named_modules():
        moe = mod if isinstance(mod, MoE) else mod.__dict__.get("moe")
        if isinstance(moe, MoE) and all(moe is not m for _, m in found):
            found.append((name, moe))
    out = []
    for i, (name, moe) in enumerate(found):
        m = re.search(r"layers?\.(\d+)", name)
        out.append((int(m.group(1)) if m else i, name, moe))
    return out


def expert_output_absmax(experts: nn.Module, x: Tensor, routing: Routing) -> Tensor:
    """[T, k]: max |expert_e(x_t)| over the model width for each filled slot (NaN where empty).
    Recomputes the experts' outputs slot by slot (the `loop` path), without mixing weights."""
    T, k = routing.expert_ids.shape
    p = plan(routing.expert_ids, experts.num_experts)
    xs = x.index_select(0, p.token)
    with torch.no_grad():
        w1, w2 = _first_matrix(experts), experts.down_proj
        ys = fused_expert_mlp(xs, w1, w2, p.counts, experts.act, experts.gated)  # [N, D]
    out = torch.full((T * k,), float("nan"), dtype=torch.float32, device=x.device)
    out[p.order] = ys.abs().amax(dim=-1).float()
    return out.view(T, k)


@dataclass
class _Batch:
    ids: Tensor  # [B, L]
    seq0: int  # global index of the batch's first sequence
    labels: dict[str, list[str]]  # column -> one label per sequence


@dataclass
class RoutingRecorder:
    """Collects rows from hooks; `flush` hands them to the writer."""

    record_outputs: bool = False
    rows: list[dict[str, np.ndarray]] = field(default_factory=list)
    batch: _Batch | None = None
    codes: dict[str, dict[str, int]] = field(default_factory=dict)  # label column -> value -> code

    def label_codes(self, column: str, values: list[str]) -> np.ndarray:
        """int32 codes of one label per sequence (dictionary-encoded in the Parquet file)."""
        table = self.codes.setdefault(column, {})
        return np.array([table.setdefault(v, len(table)) for v in values], dtype=np.int32)

    def hook(self, layer: int):
        def fn(module: MoE, args, kwargs, output) -> None:
            if self.batch is None:
                return
            routing: Routing = output[1]
            ids = self.batch.ids
            B, L = ids.shape
            T, k = routing.expert_ids.shape
            if T == B * L:
                t = np.arange(T)
            else:  # a mixture-of-depths block routes a subset of the tokens and says which ones
                context = kwargs.get("context")
                index = context.token_index if context is not None else None
                if not isinstance(index, torch.Tensor) or index.numel() != T:
                    raise RuntimeError(f"trace: layer {layer} routed {T} tokens, but the batch has {B}x{L}")
                t = index.cpu().numpy()
            logits = routing.logits.float()
            probs = torch.softmax(logits, dim=-1)
            p_top1 = probs.amax(dim=-1)  # [T]
            ent = -(probs * probs.clamp_min(1e-20).log()).sum(-1)  # [T]
            # out_absmax recomputes each slot's expert output from the layer input; a Chain-of-Experts layer
            # feeds iteration t the previous iteration's output instead, so its slots stay NaN (not recorded)
            if self.record_outputs and module.iterations == 1:
                x = (args[0] if args else kwargs["x"]).reshape(T, -1)
                absmax = expert_output_absmax(module.experts, x, routing).reshape(-1).cpu().numpy()
            else:
                absmax = np.full(T * k, np.nan, dtype=np.float32)
            row = {
                "layer": np.full(T * k, layer, dtype=np.int16),
                "seq": np.repeat(self.batch.seq0 + t // L, k).astype(np.int32),
                "pos": np.repeat(t % L, k).astype(np.int32),
                "token": np.repeat(ids.reshape(-1).cpu().numpy()[t], k).astype(np.int32),
                "slot": np.tile(np.arange(k, dtype=np.int8), T),
                "expert": routing.expert_ids.reshape(-1).cpu().numpy().astype(np.int16),
                "weight": routing.weights.detach().float().reshape(-1).cpu().numpy(),
                "p_top1": np.repeat(p_top1.cpu().numpy(), k),
                "entropy": np.repeat(ent.cpu().numpy(), k),
                "out_absmax": absmax.astype(np.float32),
            }
            for col, vals in self.batch.labels.items():
                row[col] = np.repeat(self.label_codes(col, vals)[t // L], k)
            self.rows.append(row)

        return fn


@contextmanager
def recording(model: nn.Module, record_outputs: bool = False) -> Iterator[RoutingRecorder]:
    """Attach hooks to every MoE layer of `model`; removed on exit."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no moekit MoE layers to trace (patch a Hugging Face model first)")
    rec = RoutingRecorder(record_outputs=record_outputs)
    handles = [mod.register_forward_hook(rec.hook(idx), with_kwargs=True) for idx, _, mod in layers]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


class TraceWriter:
    """Appends row chunks to one Parquet file (written to a temporary name, renamed on close)."""

    def __init__(
        self, path: str | Path, label_columns: list[str], chunk_rows: int = 1_000_000, num_experts: int | None = None
    ) -> None:
        pa = require("pyarrow")
        self.pq = require("pyarrow.parquet")
        self.pa = pa
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        fields = [
            pa.field("layer", pa.int16()),
            pa.field("seq", pa.int32()),
            pa.field("pos", pa.int32()),
            pa.field("token", pa.int32()),
            pa.field("slot", pa.int8()),
            pa.field("expert", pa.int16()),
            pa.field("weight", pa.float32()),
            pa.field("p_top1", pa.float32()),
            pa.field("entropy", pa.float32()),
            pa.field("out_absmax", pa.float32()),
        ] + [pa.field(c, pa.dictionary(pa.int32(), pa.string())) for c in label_columns]
        # E goes into the footer: a trace read back must not infer it from the experts that happened to be chosen
        metadata = {"moekit.num_experts": str(num_experts)} if num_experts is not None else None
        self.schema = pa.schema(fields, metadata=metadata)
        self.writer = self.pq.ParquetWriter(str(self.tmp), self.schema, compression="zstd")
        self.chunk_rows = chunk_rows
        self.pending: list[dict[str, np.ndarray]] = []
        self.codes: dict[str, dict[str, int]] = {}
        self.pending_rows = 0
        self.rows = 0

    def add(self, rows: list[dict[str, np.ndarray]], codes: dict[str, dict[str, int]] | None = None) -> None:
        """Queue rows (label columns hold int32 codes into `codes[column]`, value -> code)."""
        if codes is not None:
            self.codes = codes
        for r in rows:
            self.pending.append(r)
            self.pending_rows += len(r["layer"])
        if self.pending_rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        cols = {}
        for f in self.schema:
            arr = np.concatenate([r[f.name] for r in self.pending])
            if self.pa.types.is_dictionary(f.type):  # int32 codes + their values, in code order
                values = sorted(self.codes[f.name], key=self.codes[f.name].get)
                cols[f.name] = self.pa.DictionaryArray.from_arrays(
                    self.pa.array(arr, self.pa.int32()), self.pa.array(values, self.pa.string())
                )
            else:
                cols[f.name] = self.pa.array(arr, f.type)
        self.writer.write_table(self.pa.table(cols, schema=self.schema))
        self.rows += self.pending_rows
        self.pending, self.pending_rows = [], 0

    def close(self) -> Path:
        self.flush()
        self.writer.close()
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class TraceInfo:
    """What a capture wrote."""

    path: Path
    rows: int
    sequences: int
    tokens: int
    layers: list[int]


@torch.inference_mode()
def capture(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, dict[str, list[str]]]],
    path: str | Path,
    *,
    label_columns: list[str] = ("label",),
    record_outputs: bool = False,
    chunk_rows: int = 1_000_000,
    progress: bool = True,
    total: int | None = None,
    forward=None,
) -> TraceInfo:
    """Run `model` over `batches` of (ids [B, L], {label column: [B labels]}) and write the trace.

    `forward(model, ids)` runs one batch (default: `model(ids)`, which suits moekit's LM and Hugging
    Face causal LMs). A failure removes the partial file.
    """
    from rich.progress import Progress

    forward = forward or (lambda m, ids: m(ids))
    was_training = model.training
    model.eval()
    layers = moe_layers(model)
    counts = {getattr(moe.experts, "num_experts", None) for _, _, moe in layers} - {None}
    writer = TraceWriter(path, list(label_columns), chunk_rows, num_experts=max(counts) if counts else None)
    seqs = tokens = 0
    try:
        with recording(model, record_outputs) as rec, Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("tracing", total=total)
            for ids, labels in batches:
                missing = [c for c in label_columns if c not in labels]
                if missing:
                    raise ValueError(f"trace: batch lacks label columns {missing}")
                rec.batch = _Batch(ids, seqs, {c: list(labels[c]) for c in label_columns})
                forward(model, ids)
                writer.add(rec.rows, rec.codes)
                rec.rows = []
                seqs += ids.shape[0]
                tokens += ids.numel()
                bar.advance(task, ids.shape[0])
            layers = [i for i, _, _ in moe_layers(model)]
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        model.train(was_training)
    return TraceInfo(Path(path), writer.rows, seqs, tokens, layers)
