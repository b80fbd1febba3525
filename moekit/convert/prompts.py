"""Router from prompts: compose dense models into an MoE with no training, as mergekit-moe does.

Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for Merging Large Language Models" (the `mergekit-moe` script,
"FrankenMoE"): a base model gives the embeddings, attention, norms and output head; each expert e is the
feed-forward of a dense source model of the same architecture and comes with a few positive prompts that describe
what it should handle. The router of every block is written, not trained, by a gate mode:

- "hidden": the row of expert e at block l is the mean of the base model's hidden states at the input of block l's
  FFN (after `post_attention_layernorm`, what the router reads) over every token of e's prompts, normalised to
  unit length; a token is then routed to the experts whose prompts' mean state it is most aligned with.
- "embed" (mergekit's "cheap_embed"): the mean of the prompts' token embeddings, normalised, the same row in every
  block (needs no forward pass).
- "random": rows drawn from a normal and normalised (a baseline; training is then expected).

The router is moekit's `topk` (softmax over the E logits, top-k, renormalised), so with identical source models the
MoE equals them. moekit averages over all prompt tokens (mergekit reads a prompt's hidden states the same way but
its options differ by version); mergekit's negative prompts are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.convert.compose import check_same_architecture, compose
from moekit.models import MoELM
from moekit.utils.checks import check_positive_ints

MODES = ("hidden", "embed", "random")


@dataclass
class PromptsConfig:
    """How the router rows are written from the prompts."""

    mode: str = "hidden"  # gate mode: "hidden" | "embed" | "random" (see the module docstring)
    k: int = 2  # experts each token uses; 1 <= k <= number of experts (mergekit's experts_per_token)
    load_balance: float = 1e-2  # load-balance loss coefficient, for a fine-tuning after the composition
    seed: int = 0  # seeds the "random" rows

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PromptsConfig.mode must be one of {list(MODES)}, got {self.mode!r}")
        check_positive_ints("PromptsConfig.", k=self.k)
        if isinstance(self.load_balance, bool) or not isinstance(self.load_balance, int | float) or \
                not self.load_balance >= 0:
            raise ValueError(f"PromptsConfig.load_balance must be a finite number >= 0, got {self.load_balance!r}")


def _prompt_ids(prompts: Sequence[Sequence[Tensor | Sequence[int]]], vocab: int) -> list[list[Tensor]]:
    """Each expert's prompts as LongTensor [L] token ids, checked (at least one non-empty prompt per expert)."""
    out = []
    for e, ps in enumerate(prompts):
        ids = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in ps]
        if not ids or any(t.numel() == 0 for t in ids):
            raise ValueError(f"prompts: expert {e} needs at least one non-empty prompt, got {len(ids)} prompts")
        bad = [int(t.max()) for t in ids if int(t.max()) >= vocab or int(t.min()) < 0]
        if bad:
            raise ValueError(f"prompts: expert {e}'s prompt token ids must be in [0, {vocab}), got {bad[0]}")
        out.append(ids)
    return out


@torch.no_grad()
def ffn_inputs(model: MoELM, ids: Tensor) -> list[Tensor]:
    """The input of every block's FFN (after `post_attention_layernorm`) for one sequence ids [L]: n_layers x [L, D]."""
    states: list[Tensor] = []
    hooks = [b.post_attention_layernorm.register_forward_hook(lambda _m, _i, o: states.append(o[0].float()))
             for b in model.layers]
    was = model.training
    try:
        model.eval()(ids[None])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return states


def prompt_rows(base: MoELM, prompts: Sequence[Sequence[Tensor | Sequence[int]]], mode: str = "hidden",
                seed: int = 0) -> Tensor:
    """Router rows [n_layers, E, D] (unit length) from each expert's prompts through `base` (see the module)."""
    ids = _prompt_ids(prompts, base.config.vocab_size)
    n, E, D = base.config.n_layers, len(ids), base.config.dim
    if mode == "random":
        rows = torch.randn(n, E, D, generator=torch.Generator().manual_seed(seed))
    elif mode == "embed":
        emb = base.embed_tokens.weight.detach().float()
        rows = torch.stack([emb[torch.cat(p)].mean(0) for p in ids]).expand(n, E, D)
    elif mode == "hidden":
        per_expert = []
        for p in ids:
            per_prompt = [torch.stack([s.sum(0) for s in ffn_inputs(base, t)]) for t in p]  # [n, D] sums
            per_expert.append(torch.stack(per_prompt).sum(0) / sum(t.numel() for t in p))
        rows = torch.stack(per_expert, dim=1)  # [n, E, D]
    else:
        raise ValueError(f"prompts: mode must be one of {list(MODES)}, got {mode!r}")
    return torch.nn.functional.normalize(rows, dim=-1)


@torch.no_grad()
def prompts_moe(base: MoELM, experts: Sequence[MoELM], prompts: Sequence[Sequence[Tensor | Sequence[int]]],
                cfg: PromptsConfig | None = None) -> MoELM:
    """An MoE of `base`'s embeddings, attention and norms and `experts`' FFNs (one expert each), with routers from
    `prompts` (per expert, a list of token-id prompts) by `cfg.mode`. All models dense, of one architecture."""
    cfg = cfg or PromptsConfig()
    check_same_architecture([base, *experts], "prompts")
    if len(prompts) != len(experts):
        raise ValueError(f"prompts: give one list of prompts per expert ({len(experts)}), got {len(prompts)}")
    if cfg.k > len(experts):
        raise ValueError(f"PromptsConfig.k must be in [1, number of experts={len(experts)}], got {cfg.k}")
    rows = prompt_rows(base, prompts, cfg.mode, cfg.seed)
    rest = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
    args = {"k": cfg.k, "order": "softmax_topk", "normalize": True, "load_balance": cfg.load_balance}
    model = compose(experts, rest, router="topk", router_args=args, who="prompts")
    for block, r in zip(model.layers, rows, strict=True):
        block.mlp.router.weight.copy_(r.to(block.mlp.router.weight.dtype))
    return model
