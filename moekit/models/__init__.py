"""moekit's own transformer LM (dense or MoE) and its config."""

from moekit.models.config import LMConfig
from moekit.models.lm import KVCache, LMOutput, MoELM
from moekit.models.params import count_params

__all__ = ["KVCache", "LMConfig", "LMOutput", "MoELM", "count_params"]
