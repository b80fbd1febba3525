"""Mixtures of LoRA experts on any model's linear layers (moekit's routers reused as they are).

    model = attach(model, method_config("mixlora", num_experts=4, k=2))
    out = model(ids); loss = out.loss + aux_loss(model)
"""

from moekit.adapt.balance import localized_balance_loss
from moekit.adapt.config import AdaptConfig
from moekit.adapt.ffn import LoRAFFNExperts
from moekit.adapt.io import load_adapters, load_peft_expert, read_adapt_config, save_adapters, save_peft
from moekit.adapt.layer import LoRAExperts, dense_gates
from moekit.adapt.methods import list_methods, method_config
from moekit.adapt.model import (
    adapted_layers,
    adapter_state,
    attach,
    aux_loss,
    aux_losses,
    check_trainable,
    find_targets,
    merge_and_unload,
    set_sample_groups,
)
from moekit.adapt.trainer import AuxLossMixin, finetune

__all__ = [
    "AdaptConfig", "AuxLossMixin", "LoRAExperts", "LoRAFFNExperts", "adapted_layers", "adapter_state", "attach",
    "aux_loss", "aux_losses", "check_trainable", "dense_gates", "find_targets", "finetune", "list_methods",
    "load_adapters", "load_peft_expert", "localized_balance_loss", "merge_and_unload", "method_config",
    "read_adapt_config", "save_adapters", "save_peft", "set_sample_groups",
]
