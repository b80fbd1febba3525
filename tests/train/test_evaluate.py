"""One validation definition: labels without a window are left out (with a warning), never scored 0."""

from __future__ import annotations

import pytest
import torch

from moekit.models import MoELM
from moekit.train.evaluate import evaluate, validation_windows
from tests.helpers import tiny_lm


class _Val:
    def __init__(self, tokens_per_label):
        self.sizes = tokens_per_label

    def val_windows(self, seq_len, max_windows_per_label=None):
        out = {}
        for label, n in self.sizes.items():
            k = max(0, (n - 1) // seq_len)
            if max_windows_per_label is not None:
                k = min(k, max_windows_per_label)
            out[label] = torch.arange(k * (seq_len + 1)).reshape(k, seq_len + 1) % 50
        return out

    def tokens_per_label(self):
        return dict(self.sizes)


class _Data:
    def __init__(self, sizes):
        self.val = _Val(sizes)


def test_short_labels_are_left_out_with_a_warning():
    with pytest.warns(UserWarning, match=r"label 'tiny' has 3 validation tokens, fewer than one window of 9"):
        wins = validation_windows(_Data({"big": 100, "tiny": 3}), 8, 4)
    assert list(wins) == ["big"] and wins["big"][0].shape == (4, 8)
    with pytest.raises(ValueError, match="no validation window of 9 tokens"), pytest.warns(UserWarning):
        validation_windows(_Data({"tiny": 3}), 8, 4)


def test_evaluate_reports_no_loss_for_a_label_without_windows():
    model = MoELM(tiny_lm(n_layers=1, ffn_hidden=32))
    x = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(0))
    res = evaluate(model, {"a": (x, x), "empty": (x[:0], x[:0])})
    assert set(res.loss_per_label) == {"a"} and res.tokens_per_label == {"a": 24}
    assert res.loss == res.loss_per_label["a"] > 0
