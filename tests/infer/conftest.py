"""A tiny MoE run saved once per session (checkpoint + tokenizer) for the inference tests."""

from __future__ import annotations

import pytest
import torch

from moekit.models import MoELM
from moekit.train.checkpoint import save_checkpoint
from tests.helpers import tiny_lm

TEXT = ["In the beginning was the word, and the word was with the experts. " * 20]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run folder, resident model): 3 blocks, 8 experts of width 16, top-2, vocabulary 272, random weights."""
    from moekit.data import BPETokenizer
    from moekit.data.tokenizer import TokenizerConfig

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("infer") / "run"
    cfg = tiny_lm(num_experts=8, expert_hidden=16, router_args={"k": 2}, n_layers=3, vocab_size=272, init_std=0.3)
    model = MoELM(cfg).eval()
    save_checkpoint(run, model, {})
    BPETokenizer.train(TEXT, TokenizerConfig(vocab_size=270)).save(run / "tokenizer.json")
    return run, model
