"""Calibration: stream token batches through a moekit LM (or a patched Hugging Face model) and record, per
MoE layer, what the pruning methods need (issue 14).

Per MoE layer (hooks on each `MoE` module, model in eval mode, no gradients):
- `counts [E]`: token-slots routed to each expert (routing frequency);
- `saliency_sum [E]`: sum over routed slots of gate weight x ||expert output||_2 (REAP's saliency,
  Lasby et al. 2025; `saliency()` divides by `counts`);
- `peak [E]`: the largest |expert output| over routed slots (the super-expert rule's activation maxima);
- `logits_sum [E]`, `probs_sum [E]`: router logits and softmax probabilities summed over tokens (means
  via `mean_logits()` / `mean_probs()`, for similarity-based methods);
- `logits_gram [E, E]`: sum over tokens of l l^T, l the token's router logits (E x E numbers, with the
  "logits" record): the cosine similarity of the experts' router-logit columns over the calibration tokens,
  `logit_similarity()`, is what MC-SMoE groups experts by;
- `ratios`: for tokens with two or more filled slots, the second-largest weight over the largest (NAEE's
  dynamic-skipping statistic), a bounded seeded subsample;
- `inputs [N, D]`: a bounded seeded uniform subsample (reservoir) of the MoE layer's input rows, for
  reconstruction search (NAEE).
An expert never routed has count 0, saliency 0 and peak 0 and is listed in `never_routed` (no NaN).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.moe import MoE
from moekit.routing.routing import Routing

RECORDS = ("frequency", "saliency", "logits", "inputs", "ratios")


@dataclass
class LayerStats:
    """What calibration recorded for one MoE layer (E experts)."""

    block: int  # index of the block holding the layer
    counts: Tensor  # LongTensor [E] token-slots per expert
    saliency_sum: Tensor  # [E] sum of weight * ||expert output|| over routed slots
    peak: Tensor  # [E] max |expert output| over routed slots (0 when never routed)
    logits_sum: Tensor  # [E] router logits summed over tokens
    probs_sum: Tensor  # [E] softmax(logits) summed over tokens
    tokens: int = 0  # tokens seen
    inputs: Tensor | None = None  # [N, D] subsample of layer inputs (N <= max_rows)
    ratios: Tensor | None = None  # [M] second weight / top weight, subsample (M <= max_rows)
    seen_inputs: int = 0  # rows offered to the inputs reservoir
    seen_ratios: int = 0  # ratios offered to the ratios reservoir
    logits_gram: Tensor | None = None  # [E, E] float64 sum over tokens of logits^T logits ("logits" record)

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def never_routed(self) -> list[int]:
        """Experts no calibration token was routed to."""
        return [int(e) for e in (self.counts == 0).nonzero().flatten()]

    def saliency(self) -> Tensor:
        """[E] REAP saliency: mean over routed slots of weight x ||expert output||; 0 when never routed."""
        return self.saliency_sum / self.counts.clamp_min(1).to(self.saliency_sum.dtype)

    def mean_logits(self) -> Tensor:
        return self.logits_sum / max(self.tokens, 1)

    def mean_probs(self) -> Tensor:
        return self.probs_sum / max(self.tokens, 1)

    def logit_similarity(self) -> Tensor:
        """[E, E] cosine similarity of the experts' router-logit columns over the calibration tokens (0 for an
        expert whose logits were all 0). Needs the "logits" record."""
        if self.logits_gram is None:
            raise ValueError(f"block {self.block}: the calibration did not record router logits (record 'logits')")
        norm = self.logits_gram.diagonal().clamp_min(0).sqrt()
        return self.logits_gram / (norm[:, None] * norm[None, :]).clamp_min(1e-30)

    def skip_beta(self) -> float:
        """NAEE's beta: the median of the calibration's second-over-top weight ratios (0 when no token
        had two experts, i.e. skipping never fires)."""
        if self.ratios is None or not self.ratios.numel():
            return 0.0
        return float(self.ratios.median())


@dataclass
class Calibration:
    """Per-MoE-layer statistics, in block order (`layers[i].block` names the block)."""

    layers: list[LayerStats] = field(default_factory=list)
    tokens: int = 0  # tokens streamed

    @property
    def never_routed(self) -> dict[int, list[int]]:
        """block -> experts never routed in calibration (only blocks that have some)."""
        return {s.block: s.never_routed for s in self.layers if s.never_routed}

    def layer(self, block: int) -> LayerStats:
        for s in self.layers:
            if s.block == block:
                return s
        raise KeyError(f"no MoE layer at block {block}; MoE blocks: {[s.block for s in self.layers]}")


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(block index, MoE layer) in order: the MoE layers of a moekit LM (a shared WideNet layer counts once),
    or else every module that holds a moekit MoE as its `moe` (a patched Hugging Face block,
    `moekit.hf.PatchedMoE`), its block the last integer of its module name ("model.layers.3.mlp" -> 3)."""
    out, seen = [], set()
    for i, block in enumerate(getattr(model, "layers", [])):
        mlp = getattr(block, "mlp", None)
        if isinstance(mlp, MoE) and id(mlp) not in seen:
            seen.add(id(mlp))
            out.append((i, mlp))
    if out:
        return out
    for name, module in model.named_modules():
        moe = module.__dict__.get("moe")
        if isinstance(moe, MoE) and id(moe) not in seen:
            seen.add(id(moe))
            numbers = [int(p) for p in name.split(".") if p.isdigit()]
            out.append((numbers[-1] if numbers else len(out), moe))
    if len({b for b, _ in out}) != len(out):  # names without distinct layer numbers: number in order
        out = list(enumerate(m for _, m in out))
    return out


def calibrated_layers(model: nn.Module, calibration: Calibration, who: str, what: str) -> list[tuple[int, MoE]]:
    """`moe_layers(model)`, checked: at least one, and the blocks `calibration` covers. `who` names the caller and
    `what` the experts it changes ("prune", "merge") in the errors."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{who}: {type(model).__name__} has no MoE layers (a dense model has no experts to {what})")
    blocks = [b for b, _ in layers]
    if [s.block for s in calibration.layers] != blocks:
        raise ValueError(f"{who}: the calibration covers MoE blocks {[s.block for s in calibration.layers]}, "
                         f"the model has {blocks}")
    return layers


def expert_outputs(experts: nn.Module, x: Tensor, ids: Tensor) -> Tensor:
    """The output of expert ids[t] on row x[t], weight 1: x [N, D], ids LongTensor [N] -> [N, D]."""
    E = experts.num_experts
    routing = Routing(ids.view(-1, 1), torch.ones(len(ids), 1, dtype=x.dtype, device=x.device),
                      x.new_zeros(len(ids), E), E)
    return experts(x, routing)


def _reservoir(buf: Tensor | None, seen: int, rows: Tensor, cap: int, gen: torch.Generator) -> tuple[Tensor, int]:
    """Uniform reservoir sample (algorithm R) of at most `cap` rows over everything offered so far."""
    rows = rows.detach().float().cpu()
    if buf is None:
        buf = rows.new_empty((0, *rows.shape[1:]))
    room = max(cap - len(buf), 0)
    if room:
        buf = torch.cat([buf, rows[:room]])
    rest = rows[room:]
    if len(rest):
        pos = seen + room + torch.arange(len(rest))  # 0-based index of each row in the stream
        j = (torch.rand(len(rest), generator=gen, dtype=torch.float64) * (pos + 1)).long()
        take = j < cap
        if take.any():
            buf = buf.clone()
            for src, dst in zip(rest[take], j[take].tolist(), strict=True):
                buf[dst] = src
    return buf, seen + len(rows)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    record: Iterable[str] = RECORDS,
    max_rows: int = 2048,
    seed: int = 0,
) -> Calibration:
    """Stream `batches` (LongTensor [B, T] token ids) through `model` (a moekit `MoELM` or a patched Hugging
    Face model, `moekit.hf.patch`) and record the
    statistics of `record` (a subset of `RECORDS`; counts always) for every MoE layer.

    Args:
        max_rows: cap of the input-row and ratio subsamples per layer (uniform, seeded).
        seed: seed of the subsamples.
    The model's training mode is restored afterwards. A model without MoE layers is a ValueError.
    """
    record = set(record)
    unknown = sorted(record - set(RECORDS))
    if unknown:
        raise ValueError(f"calibrate: unknown records {unknown}; known: {list(RECORDS)}")
    if max_rows < 1:
        raise ValueError(f"calibrate: max_rows must be >= 1, got {max_rows}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"calibrate: {type(model).__name__} has no MoE layers (a dense model cannot be pruned)")
    coe = [b for b, layer in layers if layer.iterations > 1]
    if coe:
        raise ValueError(f"calibrate: blocks {coe} are Chain-of-Experts layers (several routers); not supported")
    gen = torch.Generator().manual_seed(seed)
    stats: list[LayerStats] = []
    hooks = []

    def make_hook(s: LayerStats):
        def hook(module: MoE, args: tuple, kwargs: dict, output: tuple[Tensor, Routing]) -> None:
            x = (args[0] if args else kwargs["x"]).reshape(-1, module.experts.dim)  # [T, D]
            routing = output[1]
            ids, w = routing.expert_ids, routing.weights
            E = s.num_experts
            s.tokens += x.shape[0]
            flat = ids.reshape(-1)
            routed = flat >= 0
            s.counts += torch.bincount(flat[routed].cpu(), minlength=E)
            if "logits" in record:
                logits = routing.logits[:, :E].float()
                s.logits_sum += logits.sum(0).cpu()
                s.probs_sum += torch.softmax(logits, dim=-1).sum(0).cpu()
                gram = (logits.double().t() @ logits.double()).cpu()  # [E, T] x [T, E] -> [E, E]
                s.logits_gram = gram if s.logits_gram is None else s.logits_gram + gram
            if "saliency" in record and routed.any():
                rows = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])[routed]
                e = flat[routed]
                out = expert_outputs(module.experts, x[rows], e).float()  # [S, D]
                norm = out.norm(dim=-1).cpu()
                s.saliency_sum.index_add_(0, e.cpu(), w.reshape(-1)[routed].float().cpu() * norm)
                s.peak.scatter_reduce_(0, e.cpu(), out.abs().amax(dim=-1).cpu(), reduce="amax")
            if "ratios" in record and ids.shape[1] >= 2:
                wk = torch.where(ids >= 0, w.float(), torch.zeros_like(w, dtype=torch.float32))
                top2 = wk.topk(2, dim=-1).values
                two = (ids >= 0).sum(-1) >= 2
                r = (top2[two, 1] / top2[two, 0].clamp_min(1e-12)).view(-1, 1)
                buf, s.seen_ratios = _reservoir(None if s.ratios is None else s.ratios.view(-1, 1),
                                                s.seen_ratios, r, max_rows, gen)
                s.ratios = buf.view(-1)
            if "inputs" in record:
                s.inputs, s.seen_inputs = _reservoir(s.inputs, s.seen_inputs, x, max_rows, gen)

        return hook

    for block, layer in layers:
        E = layer.experts.num_experts
        s = LayerStats(block, torch.zeros(E, dtype=torch.long), torch.zeros(E), torch.zeros(E),
                       torch.zeros(E), torch.zeros(E))
        stats.append(s)
        hooks.append(layer.register_forward_hook(make_hook(s), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0
    try:
        for b in batches:
            if not isinstance(b, Tensor) or b.dim() != 2 or b.is_floating_point():
                got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"calibrate: expected LongTensor batches [B, T] of token ids, got {got}")
            model(b.to(device))
            total += b.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not total:
        raise ValueError("calibrate: no calibration batches were given")
    return Calibration(stats, total)


def calibration_batches(data_or_run: Any, n: int, seq_len: int, *, batch_size: int = 8, seed: int = 0
                        ) -> list[Tensor]:
    """`n` batches of calibration windows, LongTensor [batch_size, seq_len] each, from
    - a `PreparedData` (random windows of its train split, seeded),
    - a run directory (the data it was trained on, train split), or
    - a token tensor: 1-d [N] (cut into consecutive windows) or 2-d [M, L >= seq_len] (rows cut to seq_len).
    """
    if n < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError(f"calibration_batches: n, seq_len and batch_size must be >= 1, got {n}, {seq_len}, "
                         f"{batch_size}")
    if isinstance(data_or_run, Tensor):
        t = data_or_run
        if t.is_floating_point() or t.dim() not in (1, 2):
            raise ValueError(f"calibration_batches: expected integer token ids [N] or [M, L], got "
                             f"{t.dtype} {tuple(t.shape)}")
        if t.dim() == 1:
            usable = len(t) // seq_len * seq_len
            t = t[:usable].view(-1, seq_len)
        elif t.shape[1] < seq_len:
            raise ValueError(f"calibration_batches: rows of {t.shape[1]} tokens are shorter than seq_len {seq_len}")
        t = t[:, :seq_len].long()
        if not len(t):
            raise ValueError(f"calibration_batches: fewer tokens than one window of {seq_len}")
        return [t[i:i + batch_size] for i in range(0, min(len(t), n * batch_size), batch_size)]
    data = data_or_run
    if isinstance(data_or_run, str | Path):
        from moekit.data import DataConfig, prepare_data
        from moekit.train.checkpoint import read_meta

        meta = read_meta(data_or_run)
        if not isinstance(meta.get("data"), dict):
            raise ValueError(f"{data_or_run}: the checkpoint's config.json has no data config (not a training run)")
        data = prepare_data(DataConfig(**meta["data"]), progress=False)
    train = getattr(data, "train", None)
    if train is None or not hasattr(train, "sample_batch"):
        raise TypeError(f"calibration_batches: expected PreparedData, a run directory or a token tensor, got "
                        f"{type(data_or_run).__name__}")
    gen = torch.Generator().manual_seed(seed)
    return [train.sample_batch(batch_size, seq_len, generator=gen)[0] for _ in range(n)]
