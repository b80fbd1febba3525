"""Training: the loop, schedules, checkpoints, evaluation."""

from moekit.train.checkpoint import load_model, read_meta, save_checkpoint
from moekit.train.config import TrainConfig
from moekit.train.evaluate import EvalResult, evaluate
from moekit.train.trainer import TrainResult, train

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_model",
    "read_meta",
    "save_checkpoint",
    "train",
]
