"""Expert parallelism against one process: EP=2 and EP=4 gloo processes, each holding E/P experts and a
slice of the batch, give the one-process layer's outputs, input and parameter gradients (router,
experts, shared experts), summed auxiliary losses and DeepSeek selection bias on the concatenated
batch (fp32, to 1e-6 relative to max(1, the largest value)); a rank with no tokens and experts that
receive none work; E % P != 0, expert choice and layer capacity are refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed.ep_worker import CASES, worker

ATOL = 1e-6


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"ep{world}")
    mp.start_processes(worker, args=(world, str(out)), nprocs=world, join=True, start_method="fork")
    return world, [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_one_process(results, case):
    world, ranks = results
    for rank, res in enumerate(ranks):
        r = res[case]
        grads = [k for k in r if k.startswith("grad:")]
        assert any("router" in k for k in grads) and any("experts." in k for k in grads), grads
        for key, value in r.items():
            if key in ("aux_ref", "tokens", "received_by_last_rank"):
                continue
            assert value <= ATOL, f"EP={world} rank {rank} {case}: {key} differs by {value}"


def test_balance_losses_are_global(results):
    _, ranks = results
    # the reference loss is non-zero, and the ranks' shares summed to it (checked above as "aux")
    assert ranks[0]["topk"]["aux_ref"] > 0 and ranks[0]["deepseek"]["aux_ref"] > 0
    assert "buffer:router.e_score_correction_bias" in ranks[0]["deepseek"]


def test_zero_tokens(results):
    _, ranks = results
    assert ranks[0]["empty_input"]["tokens"] == 0 and ranks[1]["empty_input"]["tokens"] > 0
    assert ranks[0]["idle_experts"]["received_by_last_rank"] == 0


def test_refusals(results):
    world, ranks = results
    msgs = ranks[0]["errors"]
    if 6 % world:
        assert "num_experts=6 does not split evenly" in msgs["uneven"]
    else:
        assert msgs["uneven"] == ""
    assert "not token_local" in msgs["expert_choice"]
    assert "capacity_factor=1.0" in msgs["capacity"]


def test_local_scope_unchanged():
    """Outside a batch scope the losses are the one-process ones (no collective, no process group)."""
    from moekit.routing.losses import load_balance_loss

    probs = torch.softmax(torch.randn(5, 4), -1)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 2], [1, -1]])
    f = torch.tensor([2, 3, 3, 1]) / 10
    assert torch.allclose(load_balance_loss(probs, ids), 4 * (f * probs.mean(0)).sum())


def test_needs_an_initialised_process_group():
    from moekit.distributed import shard_moe
    from moekit.layers import Experts, MoE
    from moekit.routing.registry import build_router

    moe = MoE(router=build_router("topk", dim=8, num_experts=4), experts=Experts(num_experts=4, dim=8, hidden=4))
    with pytest.raises(RuntimeError, match="torch.distributed initialised"):
        shard_moe(moe)
