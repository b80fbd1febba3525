"""tests/adapt: one thread per test (a shared 2-core machine)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


from tests.cli.conftest import _cache, _trained, cache_dir, trained_run  # noqa: E402, F401  (the CLI suite's micro run)
