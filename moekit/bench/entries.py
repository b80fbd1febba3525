"""The router leaderboard's entries and budgets: which model each row trains, under which size and length.

Equal compute: every MoE entry uses E experts of width F and two expert evaluations per token (k = 2,
or k = 1 over experts of width 2F for Switch, or 2 iterations of top-1 for Chain-of-Experts); routers
whose number of experts varies per token (top-p, null experts, expert choice, SMoE-Dropout in
training) are reported at their measured active FLOPs, which is what the loss-vs-FLOPs plot is for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moekit.data import DataConfig, reference_data_config
from moekit.data.reference import REFERENCE_VOCAB_SIZE
from moekit.models import LMConfig


@dataclass(frozen=True)
class Budget:
    """Model size, data and training length of one leaderboard budget."""

    steps: int  # optimiser steps per router
    batch_size: int  # sequences per step
    seq_len: int  # tokens per sequence
    lr: float  # peak learning rate
    vocab_size: int  # BPE vocabulary of the built-in corpus
    max_chars_per_domain: int  # built-in corpus characters per domain
    dim: int  # model width D
    n_layers: int  # transformer blocks (all MoE)
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads
    num_experts: int  # E
    expert_hidden: int  # F, width of one expert (k = 2 experts per token)
    eval_every: int  # validation cadence (steps)
    eval_windows: int  # validation windows per domain
    minutes_2_cores: float  # rough wall time of the whole leaderboard on 2 CPU cores
    # "builtin": the built-in corpus at vocab_size / max_chars_per_domain; "reference": the reference corpus
    # (`moekit.data.reference_data_config()`, 22.8M training tokens; vocab_size must then be its 2048 and
    # max_chars_per_domain is its own), the data of the reference models
    data: str = "builtin"

    def __post_init__(self) -> None:
        if self.data not in ("builtin", "reference"):
            raise ValueError(f"Budget.data must be 'builtin' or 'reference', got {self.data!r}")
        if self.data == "reference":
            if self.vocab_size != REFERENCE_VOCAB_SIZE:
                raise ValueError(f"Budget.vocab_size must be {REFERENCE_VOCAB_SIZE} (the reference corpus's) when "
                                 f"data='reference', got {self.vocab_size}")

    def data_config(self, seed: int) -> DataConfig:
        """The data this budget trains on (the corpus draw follows `seed`)."""
        if self.data == "reference":
            return reference_data_config(seed)
        return DataConfig(vocab_size=self.vocab_size, max_chars_per_domain=self.max_chars_per_domain, seed=seed)


BUDGETS: dict[str, Budget] = {
    # seconds: what CI runs (tests/bench)
    "smoke": Budget(steps=3, batch_size=2, seq_len=16, lr=3e-3, vocab_size=320, max_chars_per_domain=60_000,
                    dim=32, n_layers=2, n_heads=2, n_kv_heads=1, num_experts=4, expert_hidden=16,
                    eval_every=3, eval_windows=2, minutes_2_cores=0.5),
    # about 30 minutes on 2 quiet CPU cores for all 27 entries: measured ~0.25 s per step of this model
    # (2048 tokens) -> ~65 s of training + evaluation per top-2 entry; SMEAR's per-token merge and
    # SMoE-Dropout's growing k cost 2-3x that; plus building the tokenizer once
    "small": Budget(steps=250, batch_size=16, seq_len=128, lr=3e-3, vocab_size=4096, max_chars_per_domain=1_000_000,
                    dim=128, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=8, expert_hidden=128,
                    eval_every=50, eval_windows=16, minutes_2_cores=30.0),
    # a budget meant to separate routers (issue 13): small's model trained 4x longer, on the reference corpus (the
    # reference models' data: 22.8M training tokens at vocabulary 2048, so 1000 x 16 x 128 = 2M tokens never repeats
    # a window; on the ref budget two seeds of ref-dense ended 0.005 apart), evaluated on twice the windows, meant
    # for 3 seeds (`--seeds 0,1,2`). ~7-8 min per top-2 entry and seed at one torch thread; SMEAR, SMoE-Dropout and
    # THOR cost 2-3x that: ~120 min per seed for all entries on 2 cores, ~40 min per seed for the claim entries.
    "medium": Budget(steps=1000, batch_size=16, seq_len=128, lr=3e-3, vocab_size=2048,
                     max_chars_per_domain=28_000_000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, num_experts=8,
                     expert_hidden=128, eval_every=100, eval_windows=32, minutes_2_cores=120.0, data="reference"),
}


@dataclass(frozen=True)
class Entry:
    """One leaderboard row: a registered router with its arguments and any model overrides."""

    router: str | None  # registered router name (None: the dense baseline)
    router_args: dict[str, Any] = field(default_factory=dict)
    expert_scale: int = 1  # expert width = scale * F (k = 1 routers use 2F to keep the active FLOPs)
    model: dict[str, Any] = field(default_factory=dict)  # other LMConfig overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (e.g. THOR's consistency)
    note: str = ""  # shown in the table


ENTRIES: dict[str, Entry] = {
    "dense": Entry(None, note="dense SwiGLU of width 2F (same active FLOPs)"),
    "topk": Entry("topk", {"k": 2}),
    "switch": Entry("switch", {"k": 1}, expert_scale=2, note="top-1 over experts of width 2F, capacity 1.25"),
    "expert_choice": Entry("expert_choice", {"k": 2}),
    "deepseek": Entry("deepseek", {"k": 2}),
    "topp": Entry("topp", {"p": 0.4, "max_k": 4}, note="variable experts per token"),
    "null_experts": Entry("null_experts", {"k": 2, "num_null": 2}, note="a null slot costs nothing"),
    "hash": Entry("hash", {"k": 2}),
    "random": Entry("random", {"k": 2}),
    "attention": Entry("attention", {"k": 2}),
    "recurrent": Entry("recurrent", {"k": 2, "hidden": 32}, note="GRU state of width 32 (RMoE keeps it small)"),
    "mixture_of_routers": Entry("mixture_of_routers", {"k": 2, "num_routers": 4}),
    "stochastic": Entry("stochastic", {"k": 1}, expert_scale=2, train={"consistency": 1.0},
                        note="THOR: random top-1 over experts of width 2F, two passes per batch with the consistency "
                             "regulariser (alpha 1; twice the training FLOPs, tok/s counts one pass)"),
    "smoe_dropout": Entry("smoe_dropout", {"k_start": 1, "eval_k": 2},
                          note="k grows 1 -> E in training (more training FLOPs); evaluated at k = 2"),
    "moec": Entry("moec", {"k": 2, "cluster_size": 2}),
    "graph_of_tokens": Entry("graph_of_tokens", {"k": 2}),
    "prototype": Entry("prototype", {"k": 2}),
    "uncertainty": Entry("uncertainty", {"k": 2}),
    "nexus": Entry("nexus", {"k": 2}, note="Nexus router trained from scratch: fixed random domain embeddings through "
                                            "a learned SwiGLU projection (no domains here; see docs/convert.md)"),
    "sparsemixer": Entry("sparsemixer", {"k": 2}, note="SparseMixer / GRIN (PhiMoE): sampled experts in training "
                                                         "with GRIN's gradient estimate"),
    "chain": Entry("topk", {"k": 1}, model={"moe_iterations": 2}, note="Chain-of-Experts: 2 iterations of top-1"),
    "smear": Entry("smear", {}, expert_scale=2, model={"experts": "smear"},
                   note="one merged expert of width 2F per token (causal prefix routing); the per-token merge "
                        "costs E expert projections in this implementation, counted here as 1"),
    "film": Entry("uncertainty", {"k": 2}, expert_scale=2, model={"experts": "film"},
                  note="MoFME: uncertainty router over feature-modulated experts sharing one FFN of width 2F"),
    "duo": Entry("null_experts", {"k": 1, "num_null": 1, "normalize": False}, expert_scale=2,
                 model={"experts": "duo", "num_experts": 2},
                 note="Duo-LLM: per token a big (2F) or small (F/2) FFN, or skip (null expert)"),
    "widenet": Entry("topk", {"k": 2}, model={"share_blocks": True},
                     note="WideNet: one attention + MoE shared by all blocks, per-block norms (fewer parameters)"),
    "autonomy": Entry("autonomy", {"k": 2, "rank": 16}, model={"experts": "autonomy", "experts_args": {"rank": 16}},
                      note="Autonomy-of-Experts: experts pick themselves by low-rank activation norm"),
    "hecto": Entry("topk", {"k": 1}, expert_scale=2, model={"experts": "hecto", "num_experts": 2},
                   note="Hecto: top-1 between an FFN expert of width 2F and a GRU expert (hidden D) that sees only "
                        "its own tokens"),
    "hecto_baseline": Entry("topk", {"k": 1}, expert_scale=2, model={"num_experts": 2},
                            note="Hecto's homogeneous baseline: the same top-1 routing between two FFN experts of "
                                 "width 2F"),
    "mixture_of_depths": Entry("topk", {"k": 2}, model={"mod_capacity": 0.125},
                               note="Mixture-of-Depths on top-2 MoE blocks: blocks 1 and 3 process 12.5% of each "
                                    "sequence (top-k in training, causal per-token decisions in evaluation)"),
}


def model_config(entry: Entry, budget: Budget, vocab_size: int) -> LMConfig:
    """The LMConfig of one entry under a budget."""
    base = dict(vocab_size=vocab_size, dim=budget.dim, n_layers=budget.n_layers, n_heads=budget.n_heads,
                n_kv_heads=budget.n_kv_heads, max_seq_len=budget.seq_len)
    if entry.router is None:
        return LMConfig(**base, ffn_hidden=2 * budget.expert_hidden, **entry.model)
    args = dict(entry.router_args)
    if entry.router == "smoe_dropout":
        args.setdefault("anneal_steps", budget.steps)
    moe = dict(num_experts=budget.num_experts, expert_hidden=entry.expert_scale * budget.expert_hidden,
               router=entry.router, router_args=args)
    return LMConfig(**base, **{**moe, **entry.model})
