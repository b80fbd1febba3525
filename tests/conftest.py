"""Shared fixtures: small sizes, fixed seeds, CPU fp32."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
