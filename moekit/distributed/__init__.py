"""Expert parallelism on torch.distributed (gloo on CPU, NCCL on GPUs), launched by torchrun."""

from moekit.distributed.all_to_all import all_to_all, exchange_counts
from moekit.distributed.data_parallel import (
    expert_parameter_names,
    global_sum,
    shard_model,
    share_of_mean,
    sync_gradients,
)
from moekit.distributed.ep import ExpertParallelExperts, ExpertParallelMoE, check_routers, shard_moe

__all__ = [
    "ExpertParallelExperts", "ExpertParallelMoE", "all_to_all", "check_routers", "exchange_counts",
    "expert_parameter_names", "global_sum", "shard_model", "share_of_mean", "shard_moe", "sync_gradients",
]
