"""Adding the adapters' auxiliary losses to a training loss.

- `transformers.Trainer`: mix `AuxLossMixin` in before `Trainer` (`class MyTrainer(AuxLossMixin, Trainer)`); its
  `compute_loss` adds `aux_loss(model)` of the forward it just ran.
- moekit's trainer: nothing to do; `attach` adds the adapters' losses to `LMOutput.aux_loss`, which
  `moekit.train.trainer.micro_batch_loss` already adds. `finetune` below is the short loop `moekit adapt` runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moekit.adapt.model import CONFIG_ATTR, aux_loss, check_trainable, set_sample_groups


class AuxLossMixin:
    """`compute_loss` for `transformers.Trainer` subclasses: the model's loss plus the adapter routers' aux losses."""

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        aux = aux_loss(model)
        if aux is not None:
            loss = loss + aux.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss


def finetune(model: nn.Module, source: Any, *, steps: int, batch_size: int, seq_len: int, lr: float = 1e-3,
             seed: int = 0) -> list[dict[str, float]]:
    """A few AdamW steps on the trainable parameters of a moekit LM; `source.sample_batch(B, L, generator)` gives
    (inputs [B, L], targets [B, L], labels [B]). With LoRAMoE's localized balancing constraint, a sample's group is
    its label modulo `AdaptConfig.expert_groups`. Returns one {"step", "loss", "aux"} per step."""
    from moekit.train.trainer import micro_batch_loss

    check_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    config = getattr(model, CONFIG_ATTR, None)
    groups = config.expert_groups if config is not None and config.localized_balance > 0 else 0
    model.train()
    log = []
    for step in range(1, steps + 1):
        x, y, labels = source.sample_batch(batch_size, seq_len, gen)
        if groups:
            set_sample_groups(model, (labels % groups).to(device))
        ce, aux, _, _ = micro_batch_loss(model, x.to(device), y.to(device), 0.0)
        loss: Tensor = ce + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.append({"step": step, "loss": float(ce.detach()), "aux": float(aux.detach())})
    model.eval()
    if groups:
        set_sample_groups(model, None)
    return log
