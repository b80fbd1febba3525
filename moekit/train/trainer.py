"""One readable training loop: AdamW, warmup + cosine, clipping, accumulation, MoE auxiliary losses,
per-label validation, a rich progress bar, JSONL logs, atomic checkpoints, Ctrl-C/SIGTERM and resume.

Resuming is exact: the data order comes from a torch.Generator and the model's own randomness from
torch's global RNG, both saved with the optimiser, so 10 + 10 resumed steps give the same weights as 20.
A run holds a lock on its folder while it trains, so a second process can neither train into it nor
mistake its checkpoint write in progress for the leftovers of a killed one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from moekit.models import LMConfig, MoELM
from moekit.models.lm import LMOutput
from moekit.routing.stochastic import consistency_loss
from moekit.train.checkpoint import (
    CKPT,
    TMP_PREFIX,
    load_model,
    load_trainer_state,
    read_meta,
    recover_run,
    save_checkpoint,
)
from moekit.train.config import TrainConfig
from moekit.train.device import autocast, resolve_device, rng_state, set_rng_state, to_cpu
from moekit.train.evaluate import EvalResult, evaluate
from moekit.train.schedule import lr_at
from moekit.utils.io import atomic_copy, atomic_write_text, folder_lock


class TrainSource(Protocol):
    """What the loop needs from training data."""

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs [B, L], targets [B, L], label ids [B])."""
        ...


@dataclass
class TrainResult:
    """What a finished (or interrupted) run leaves behind."""

    run_dir: Path
    step: int  # optimiser steps done
    interrupted: bool  # stopped by Ctrl-C or SIGTERM (a checkpoint was written)
    final_eval: EvalResult | None  # validation at the last step
    history: list[dict]  # the eval log lines: {"step", "loss", "loss_per_label", ...}
    train_log: list[dict]  # the train log lines


def make_optimizer(model: MoELM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# extra_loss(inputs [B, L], targets [B, L], the student's LMOutput) -> a scalar added to the training loss
# (already weighted), e.g. a distillation term (moekit.compress.distill)
ExtraLoss = Callable[[Tensor, Tensor, LMOutput], Tensor]


def micro_batch_loss(
    model: MoELM, x: Tensor, y: Tensor, consistency: float, precision: Any = None
) -> tuple[Tensor, Tensor, Tensor, LMOutput]:
    """(cross-entropy, auxiliary loss, consistency term, the last LMOutput) of one micro-batch; the forward
    passes run inside `precision` (a context manager, e.g. bf16 autocast) when given.

    consistency > 0 (THOR, Zuo et al. 2022): two forward passes with independent random routing draws; the
    cross-entropy and auxiliary losses are the means of the two, the consistency term is the symmetric KL
    between their next-token distributions (`moekit.routing.stochastic.consistency_loss`)."""
    with precision if precision is not None else contextlib.nullcontext():
        outs = [model(x, targets=y) for _ in range(2 if consistency else 1)]
        ce = torch.stack([o.loss for o in outs]).mean()
        auxes = [o.aux_loss for o in outs if o.aux_loss is not None]
        aux = torch.stack(auxes).mean() if auxes else ce.new_zeros(())
        cons = consistency_loss(outs[0].logits, outs[1].logits) if consistency else ce.new_zeros(())
    return ce, aux, cons, outs[-1]


def load_balance_stat(routings: list) -> float:
    """Mean over MoE layers of the busiest expert's load over the mean load (1.0 = balanced)."""
    vals = [r.stats()["max_over_mean_load"] for r in routings if r is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def _diff(a: dict, b: dict) -> list[str]:
    return [
        f"{k}: checkpoint {a.get(k)!r} vs requested {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Cut a JSONL log back to the rows of steps <= `step` (what a checkpoint at `step` has seen), atomically.

    Rows are in step order, so the kept part is a prefix: it ends at the first row past `step` or at a line
    a killed write left half written."""
    if not path.is_file():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or row.get("step", step + 1) > step:
            break
        kept.append(line if line.endswith("\n") else line + "\n")
    new = "".join(kept)
    if new != text:
        atomic_write_text(path, new)


RESUME_MAY_CHANGE = ("steps", "device", "bf16_on_cpu")  # TrainConfig fields a resumed run may change
LOCK_WAIT_S = 2.0  # how long a new run waits for the run folder's lock (a reader's clean-up holds it for milliseconds)


def load_init(model: MoELM, path: str | Path) -> None:
    """Copy the weights of the checkpoint at `path` into `model` (whose config may differ only in fields that
    keep every tensor's shape, e.g. loss coefficients); a mismatch is ValueError naming the tensors."""
    src = load_model(path).state_dict()
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(src)), sorted(set(src) - set(want))
    wrong = sorted(k for k in set(src) & set(want) if src[k].shape != want[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"--init {path}: its weights do not fit the model config (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]}); train with the checkpoint's own model config"
        )
    model.load_state_dict(src)


class RunInUse(FileExistsError):
    """Another process is training into the run folder."""


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Make `run_dir` ready for a run; the caller holds its lock.

    Leftovers of a killed checkpoint write are cleaned (`recover_run`). A folder with a checkpoint is refused
    unless `resume` (continue it; the logs are cut back to its step) or `overwrite` (its checkpoint and logs are
    deleted first); a fresh run starts new logs."""
    recover_run(run_dir)
    ckpt = run_dir / CKPT
    logs = (run_dir / "train.jsonl", run_dir / "eval.jsonl")
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoint")
        step = int(read_meta(run_dir)["step"])
        for p in logs:
            truncate_log(p, step)
        return
    if ckpt.exists():
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a checkpoint; pass --resume (resume=True) to continue it, "
                "--overwrite (overwrite=True) to start over, or choose another directory"
            )
        trash = run_dir / f"{TMP_PREFIX}discarded-{uuid.uuid4().hex[:8]}"
        os.replace(ckpt, trash)  # a temp name: a kill while deleting leaves only what recover_run removes
        recover_run(run_dir)
    for p in logs:
        if p.exists():
            p.unlink()


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM while training: the first asks the loop to stop after the step in progress
    (it then writes a checkpoint), a second one aborts at once with KeyboardInterrupt. Handlers are installed
    only in the main thread (the only one Python delivers signals to) and restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(again to abort without one)",
            file=sys.stderr,
            flush=True,
        )


def train(
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    train_data: TrainSource,
    val_windows: dict[str, tuple[Tensor, Tensor]],
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    meta: dict[str, Any] | None = None,
    files: dict[str, Path] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int], None] | None = None,
    init: str | Path | None = None,
    extra_loss: ExtraLoss | None = None,
) -> TrainResult:
    """Train `model_cfg` with `train_cfg` into `run_dir`.

    A run directory that already holds a checkpoint is refused unless `resume=True` (continue it) or
    `overwrite=True` (delete it and start over); resuming requires the same model config and the same train
    config except `steps` (which may grow), and cuts the JSONL logs back to the checkpoint's step.
    `files` (name -> source path) are copied into the run folder before the first step (the tokenizer).
    `stop_after` ends this invocation after that many total steps (with a checkpoint) while the
    schedule still spans `steps`: 10 steps with stop_after=10, then a resume to 20, equal 20 steps.
    Ctrl-C or SIGTERM stops after the current step with a checkpoint (`TrainResult.interrupted`).
    `on_step(step)` is called after every optimiser step (tests use it to simulate Ctrl-C).
    `init` (a checkpoint or run folder, e.g. one `moekit convert` wrote) starts a new run from its weights
    instead of a random init, with a fresh optimiser and schedule; its tensors must fit `model_cfg`. A resumed
    run continues from its own checkpoint and ignores `init`.
    `extra_loss(x, y, out)` adds a term to every micro-batch's loss (logged as "extra"): e.g. distillation from a
    teacher (`moekit.compress.distill`). A resumed run must be given the same function again.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or start it over")
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"nothing to resume: {run_dir} does not exist")
    run_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if not stack.enter_context(folder_lock(run_dir, wait_s=LOCK_WAIT_S)):
            raise RunInUse(f"{run_dir} is in use: another process is training into it")
        claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
        for name, src in (files or {}).items():
            atomic_copy(src, run_dir / name)
        stop = stack.enter_context(StopRequest())
        return _train(
            model_cfg,
            train_cfg,
            train_data,
            val_windows,
            run_dir,
            resume=resume,
            meta=meta,
            progress=progress,
            stop_after=stop_after,
            on_step=on_step,
            stop=stop,
            init=init,
            extra_loss=extra_loss,
        )


def _train(
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    train_data: TrainSource,
    val_windows: dict[str, tuple[Tensor, Tensor]],
    run_dir: Path,
    *,
    resume: bool,
    meta: dict[str, Any] | None,
    progress: bool,
    stop_after: int | None,
    on_step: Callable[[int], None] | None,
    stop: StopRequest,
    init: str | Path | None = None,
    extra_loss: ExtraLoss | None = None,
) -> TrainResult:
    """The loop of `train`, in a run folder already claimed."""
    train_log_path, eval_log_path = run_dir / "train.jsonl", run_dir / "eval.jsonl"

    device = resolve_device(train_cfg.device, train_cfg.dtype, bf16_on_cpu=train_cfg.bf16_on_cpu)
    torch.manual_seed(train_cfg.seed)
    data_gen = torch.Generator().manual_seed(train_cfg.seed + 1)
    start = 0
    if resume:
        old = read_meta(run_dir)
        # through LMConfig, so a field added since the checkpoint was written takes its default (as `same_run` does)
        saved_model = LMConfig.from_dict(old["model"]).to_dict()
        if saved_model != model_cfg.to_dict():
            raise ValueError(
                "cannot resume: model config differs from the checkpoint's:\n  "
                + "\n  ".join(_diff(saved_model, model_cfg.to_dict()))
            )
        old_train = {k: v for k, v in {"dtype": "float32", **old["train"]}.items() if k not in RESUME_MAY_CHANGE}
        new_train = {k: v for k, v in train_cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}
        if old_train != new_train:
            raise ValueError(
                "cannot resume: train config differs from the checkpoint's:\n  "
                + "\n  ".join(_diff(old_train, new_train))
            )
        model = load_model(run_dir).to(device)
        opt = make_optimizer(model, train_cfg)
        st = load_trainer_state(run_dir)
        if st is None:
            raise FileNotFoundError(f"cannot resume: {run_dir}/checkpoint has no trainer_state.pt")
        opt.load_state_dict(st["optimizer"])  # moves the state to the parameters' device
        set_rng_state(st, device)
        data_gen.set_state(st["data_rng"])
        start = int(st["step"])
    else:
        model = MoELM(model_cfg)  # initialised on CPU: the same weights on every device
        if init is not None:
            load_init(model, init)
            meta = {**(meta or {}), "init": str(init)}
        model = model.to(device)
        opt = make_optimizer(model, train_cfg)
    model.train()
    precision = autocast(device, train_cfg.dtype)
    meta = {"train": train_cfg.to_dict(), **(meta or {})}
    saved = start if resume else -1  # the step of the checkpoint on disk

    def checkpoint(step: int) -> None:
        nonlocal saved
        if step == saved:
            return
        state = {
            "optimizer": to_cpu(opt.state_dict()),  # device-independent checkpoints
            **rng_state(device),
            "data_rng": data_gen.get_state(),
            "step": step,
        }
        save_checkpoint(run_dir, model, {**meta, "step": step}, state)
        saved = step

    history: list[dict] = []
    train_log: list[dict] = []
    final_eval: EvalResult | None = None

    def run_eval(step: int) -> None:
        nonlocal final_eval
        final_eval = evaluate(model, val_windows, batch_size=train_cfg.batch_size)
        row = {"step": step, "loss": final_eval.loss, "loss_per_label": final_eval.loss_per_label}
        if final_eval.experts_per_token:
            row["experts_per_token"] = final_eval.experts_per_token
        history.append(row)
        _append_jsonl(eval_log_path, row)

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        disable=not progress,
        transient=False,
    )
    step = start
    interrupted = False
    snapshot = (rng_state(device), data_gen.get_state())
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum
    with bar:
        task = bar.add_task("train", total=train_cfg.steps, completed=start, info="")
        try:
            end = min(train_cfg.steps, stop_after) if stop_after is not None else train_cfg.steps
            while step < end and stop.signum is None:
                t0 = time.perf_counter()
                lr = lr_at(
                    step,
                    lr=train_cfg.lr,
                    warmup=train_cfg.warmup_steps,
                    total=train_cfg.steps,
                    min_ratio=train_cfg.min_lr_ratio,
                )
                for g in opt.param_groups:
                    g["lr"] = lr
                loss_sum, aux_sum, cons_sum, extra_sum, balance = 0.0, 0.0, 0.0, 0.0, float("nan")
                for _ in range(train_cfg.grad_accum):
                    x, y, _labels = train_data.sample_batch(train_cfg.batch_size, train_cfg.seq_len, data_gen)
                    x, y = x.to(device), y.to(device)  # no copy on CPU
                    ce, aux, cons, out = micro_batch_loss(model, x, y, train_cfg.consistency, precision)
                    loss = ce + aux + train_cfg.consistency * cons
                    if extra_loss is not None:  # no extra tensor or sync per micro-batch without one
                        with precision if precision is not None else contextlib.nullcontext():
                            extra = extra_loss(x, y, out)
                        loss = loss + extra
                        extra_sum += float(extra.detach()) / train_cfg.grad_accum
                    (loss / train_cfg.grad_accum).backward()
                    loss_sum += float(ce.detach()) / train_cfg.grad_accum
                    aux_sum += float(aux.detach()) / train_cfg.grad_accum
                    cons_sum += float(cons.detach()) / train_cfg.grad_accum
                    balance = load_balance_stat(out.routings)
                if train_cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                snapshot = (rng_state(device), data_gen.get_state())  # where step+1 starts: restored on Ctrl-C
                tps = tokens_per_step / (time.perf_counter() - t0)
                bar.update(task, advance=1, info=f"loss {loss_sum:.3f}  tok/s {tps:,.0f}  load max/mean {balance:.2f}")
                if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                    row = {
                        "step": step,
                        "loss": loss_sum,
                        "aux": aux_sum,
                        "lr": lr,
                        "tokens_per_s": tps,
                        "load_max_over_mean": balance,
                    }
                    if train_cfg.consistency:
                        row["consistency"] = cons_sum
                    if extra_loss is not None:
                        row["extra"] = extra_sum
                    train_log.append(row)
                    _append_jsonl(train_log_path, row)
                if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                    run_eval(step)
                if step % train_cfg.ckpt_every == 0 or step in (train_cfg.steps, end):
                    checkpoint(step)
                if on_step is not None:
                    on_step(step)
            if stop.signum is not None and step < end:  # a signal: the step in progress was finished
                interrupted = True
                checkpoint(step)
        except KeyboardInterrupt:
            if stop.signum is not None:  # a second signal: abort at once; the last checkpoint on disk stays whole
                raise
            # Drop the unfinished step (its gradients and random draws) so that resuming replays it exactly.
            interrupted = True
            opt.zero_grad(set_to_none=True)
            set_rng_state(snapshot[0], device)
            data_gen.set_state(snapshot[1])
            checkpoint(step)
    return TrainResult(run_dir, step, interrupted, final_eval, history, train_log)
