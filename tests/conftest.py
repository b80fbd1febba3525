"""Shared test setup: fixed seeds, CPU fp32, one torch thread.

Tests use tiny tensors, where a second thread only adds synchronisation (and on a shared 2-core
machine, contention): one thread makes the suite several times faster.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
