"""Hugging Face interop: patch transformers MoE models in place (`patch`, `unpatch`, `routings`,
`aux_loss`), save them back (`save`), describe checkpoints without loading them (`describe`), and
export moekit's own LM to a transformers family (`export_lm`). See docs/hf.md.

transformers is imported only when one of these is called (moekit.utils.deps).
"""

from moekit.hf.export import ExportError, export_lm, export_targets, hf_config_for, to_hf
from moekit.hf.families import FAMILIES, Family, family_names, get_family
from moekit.hf.inspect import describe, is_hf_dir
from moekit.hf.patch import (
    NotExpressible,
    PatchedMoE,
    aux_loss,
    config_updates,
    is_patched,
    patch,
    patched_layers,
    routings,
    unpatch,
)
from moekit.hf.save import save

__all__ = [
    "FAMILIES",
    "ExportError",
    "Family",
    "NotExpressible",
    "PatchedMoE",
    "aux_loss",
    "config_updates",
    "describe",
    "export_lm",
    "export_targets",
    "family_names",
    "get_family",
    "hf_config_for",
    "is_hf_dir",
    "is_patched",
    "patch",
    "patched_layers",
    "routings",
    "save",
    "to_hf",
    "unpatch",
]
