"""Worker of the data-parallel test: one spawned gloo process per rank trains a tiny MoE LM for 5 AdamW
steps with expert parallelism (its slice of each global batch, E / P experts per layer) and, in the
same process, the one-process model on the whole batch; writes the loss curves and the largest
parameter differences to `<out>/rank<r>.json`."""

from __future__ import annotations

import copy
import json
import os

import torch
import torch.distributed as dist

from moekit.distributed import expert_parameter_names, global_sum, shard_model, share_of_mean, sync_gradients
from moekit.models import LMConfig, MoELM

STEPS, BATCH, SEQ = 5, 4, 8


def config(router: str) -> LMConfig:
    args = {"k": 2, "load_balance": 0.1, "z_loss": 0.01} if router == "topk" else {"k": 2, "bias_update_rate": 0.01,
                                                                                   "seq_balance": 0.1}
    return LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, num_experts=4,
                    expert_hidden=16, router=router, router_args=args, num_shared_experts=1)


def train(router: str, world: int, rank: int) -> dict:
    torch.manual_seed(0)
    model = MoELM(config(router))
    batch = torch.randint(0, 64, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    data = batch.expand(STEPS, BATCH, SEQ + 1)  # one batch, so the loss falls in 5 steps
    ref, ep = copy.deepcopy(model), shard_model(copy.deepcopy(model))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(ep.parameters(), lr=1e-2)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    ref_losses, losses = [], []
    for step in range(STEPS):
        ids, targets = data[step, :, :-1], data[step, :, 1:]
        out = ref(ids, targets=targets)
        loss = out.loss + out.aux_loss
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        ref_losses.append(float(loss))

        out = ep(ids[rows], targets=targets[rows])
        loss = share_of_mean(out.loss, targets[rows].numel()) + out.aux_loss  # this rank's share
        opt.zero_grad()
        loss.backward()
        sync_gradients(ep)
        opt.step()
        losses.append(global_sum(loss))
    experts = expert_parameter_names(ep)
    ref_params = dict(ref.named_parameters())
    diffs = {}
    for name, p in ep.named_parameters():
        want = ref_params[name].detach()
        if name in experts:
            local = p.shape[0]
            want = want[rank * local : (rank + 1) * local]
        diffs[name] = float((p.detach() - want).abs().max())
    for name, b in ep.named_buffers():
        if name.endswith("e_score_correction_bias"):
            diffs[name] = float((b - dict(ref.named_buffers())[name]).abs().max())
    return {"ref_losses": ref_losses, "losses": losses, "diffs": diffs, "experts": sorted(experts)}


def worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        results = {router: train(router, world, rank) for router in ("topk", "deepseek")}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
