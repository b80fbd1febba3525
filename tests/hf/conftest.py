"""tests/hf need transformers (an optional dependency of moekit). The tiny models run on one
thread: on a shared 2-core machine, several threads per op mostly wait on each other."""

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
