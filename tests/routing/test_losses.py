"""Auxiliary losses against hand-computed values."""

from __future__ import annotations

import math

import torch

from moekit.routing.losses import (
    entropy_loss,
    expert_fraction,
    load_balance_loss,
    sequence_load_balance_loss,
    z_loss,
)


def test_load_balance_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.0))


def test_load_balance_hand_computed():
    # 2 tokens, 2 experts, k=1: both to expert 0; mean P = (0.75, 0.25)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    ids = torch.tensor([[0], [0]])
    # E * sum f_i P_i = 2 * (1.0 * 0.75 + 0 * 0.25) = 1.5
    torch.testing.assert_close(load_balance_loss(probs, ids), torch.tensor(1.5))


def test_expert_fraction_ignores_empty_slots():
    ids = torch.tensor([[0, -1], [1, 1]])
    torch.testing.assert_close(expert_fraction(ids, 3), torch.tensor([0.25, 0.5, 0.0]))


def test_sequence_balance_is_mean_of_per_sequence_losses():
    probs = torch.softmax(torch.randn(12, 5), -1)
    ids = torch.randint(0, 5, (12, 2))
    want = (load_balance_loss(probs[:6], ids[:6]) + load_balance_loss(probs[6:], ids[6:])) / 2
    torch.testing.assert_close(sequence_load_balance_loss(probs, ids, seq_len=6), want)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    want = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(z_loss(logits), torch.tensor(want))


def test_entropy_loss():
    torch.testing.assert_close(entropy_loss(torch.full((3, 4), 0.25)), torch.tensor(math.log(4.0)))
    torch.testing.assert_close(entropy_loss(torch.eye(4)), torch.tensor(0.0))
