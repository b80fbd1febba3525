"""Data parallel around expert parallelism: 2 gloo processes train a tiny MoE LM (topk and deepseek
routers, a shared expert) for 5 AdamW steps on halves of each global batch and give the one-process
run's loss curve and parameters (replicated ones equal, expert shards equal to their slices)."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from tests.distributed.train_worker import worker


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dp2")
    mp.start_processes(worker, args=(2, str(out)), nprocs=2, join=True, start_method="fork")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("router", ["topk", "deepseek"])
def test_two_processes_train_like_one(results, router):
    for rank, res in enumerate(results):
        r = res[router]
        assert len(r["losses"]) == 5
        for step, (a, b) in enumerate(zip(r["losses"], r["ref_losses"], strict=True)):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"rank {rank} step {step}: loss {a} vs one process {b}"
        assert r["ref_losses"][-1] < r["ref_losses"][0]  # it trained
        assert any(".mlp.experts." in n for n in r["experts"]) and not any("router" in n for n in r["experts"])
        bad = {n: d for n, d in r["diffs"].items() if d > 1e-5}
        assert not bad, f"rank {rank}: parameters differ from the one-process run: {bad}"
