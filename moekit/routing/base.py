"""Pieces every router uses: input and logit checks, argument checks, the softmax -> top-k -> renormalise
step, the linear gate, the capabilities generic code asks about, the config round trip.

Routers subclass `Router` only for these helpers (and `nn.Module`); the algorithm lives in each
router's own file.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from moekit.routing.registry import router_config
from moekit.routing.routing import RoutingContext
from moekit.routing.scope import batch_sum
from moekit.utils.checks import check_positive_ints, is_positive_int


def check_input(x: Tensor, dim: int, who: str, *, finite: bool = False) -> None:
    """Raise if `x` is not a [T, dim] floating tensor.

    `finite=True` also rejects NaN/inf: for routers whose decisions do not pass through logits computed
    from `x` (hash, random, stochastic), which would otherwise route a NaN token silently. Routers with
    learned scores check their logits instead (`check_logits`), which is cheaper ([T, E] vs [T, D])."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a Tensor [T, {dim}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{who}: expected input of shape [T, {dim}] (tokens, dim), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got {x.dtype}")
    if finite and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(
            f"{who}: router input contains {bad} non-finite values (NaN or inf); check the activations "
            "that reach this layer"
        )


def check_logits(logits: Tensor, who: str) -> None:
    """Raise if router logits hold NaN or inf (a silent NaN would route every token to expert 0)."""
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise FloatingPointError(
            f"{who}: router logits contain {bad} non-finite values (NaN or inf); check the input "
            "activations and the router weights"
        )


def check_k(k: int, num_experts: int, who: str) -> None:
    """Raise unless 1 <= k <= num_experts."""
    if not is_positive_int(k) or k > num_experts:
        raise ValueError(f"{who}: k must be an integer in [1, num_experts={num_experts}], got {k!r}")


def check_choice(value: Any, allowed: tuple[str, ...], field: str, who: str) -> None:
    """Raise unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{who}: {field} must be one of {list(allowed)}, got {value!r}")


def check_nonnegative(who: str, **values: Any) -> None:
    """Raise ValueError unless every value is a finite real number >= 0 (bools are not numbers)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{who}: {name} must be a finite number >= 0, got {v!r}")


def check_int(who: str, **values: Any) -> None:
    """Raise ValueError unless every value is an int (bools are not numbers)."""
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{who}: {name} must be an integer, got {v!r}")


def check_positive(who: str, **values: Any) -> None:
    """Raise ValueError unless every value is a real number > 0 (bools are not numbers)."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ValueError(f"{who}: {name} must be > 0, got {v!r}")


def seq_len_of(context: RoutingContext | None) -> int | None:
    """The sequence length of the rows (`MoE` sets it for [B, L, D] inputs), or None."""
    return context.seq_len if context is not None else None


def renormalize(weights: Tensor, eps: float = 1e-20) -> Tensor:
    """weights [T, k] divided by their row sums; a row summing to less than `eps` (every slot empty or
    underflowed) is divided by `eps` instead of giving NaN. Where the sum is >= eps the result is exactly
    `weights / weights.sum(-1, keepdim=True)`. Routers call it on float32 weights (`eps` must be
    representable in the weights' dtype)."""
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(eps)


def top_k(probs: Tensor, k: int, *, normalize: bool, select: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """probs [T, E] -> (weights [T, k], expert ids [T, k]) of the k largest, rescaled to sum 1 per row
    when `normalize` (`renormalize`). `select` [T, E]: choose the k largest of these scores instead
    (`Router.biased(probs)`), still weighting by `probs`."""
    if select is None or select is probs:
        weights, ids = torch.topk(probs, k, dim=-1)
    else:
        ids = torch.topk(select, k, dim=-1).indices
        weights = probs.gather(1, ids)
    if normalize:
        weights = renormalize(weights)
    return weights, ids


def softmax_top_k(logits: Tensor, k: int, *, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The softmax -> top-k -> renormalise step: logits [T, E] -> (probs [T, E] float32, weights [T, k]
    float32, expert ids [T, k]). `probs` (over all E) is what the balance losses read."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = top_k(probs, k, normalize=normalize)
    return probs, weights, ids


def jitter(x: Tensor, eps: float) -> Tensor:
    """Switch Transformer input jitter: multiply by U(1 - eps, 1 + eps)."""
    return x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)


class Router(nn.Module):
    """Common base: `dim`, `num_experts`, a gate weight [E, D] (the Hugging Face router layout).

    `losses` names the router's auxiliary-loss coefficients (`{"load_balance": 1e-2, "z_loss": 0.0}`):
    the base validates every one (a finite number >= 0) and stores it as an attribute of that name,
    so no router checks its coefficients by hand. `loss_names` lists them.

    `k`, when given, is checked (an integer in [1, num_experts]) and stored as `self.k`.

    Two options top-k style routers opt into by passing them on (stored under their own names):
        routed_scale: a finite number > 0 that multiplies the routed weights (`scale_weights`): with
            `normalize=True` and `routed_scale=k` the k weights sum to k, so k experts of width F start
            at the output scale of a dense FFN of width k*F (DeepSeek-V3's routed scaling factor).
        selection_bias: keep DeepSeek-V3's auxiliary-loss-free balancing bias, the float32 buffer
            `e_score_correction_bias [gate_outputs]`: routers choose experts by `biased(scores)` but weight
            them by the unbiased scores; in training `maybe_update_bias(ids)` moves it by
            `bias_update_rate * sign(mean load - load_i)`. `has_selection_bias` says whether a router has one.

    Class attributes routers override to say what they need and do (generic code asks these, never names):
        variable_k: the number of experts per token varies by token (top-p, null experts, expert
            choice); `nominal_k` is then a bound or an average, not what every token uses.
        needs_full_sequence: the router reads whole sequences (`RoutingContext.seq_len` must describe
            its rows: smear, graph of tokens), so it cannot route a subset of a sequence's tokens.
        needs_previous: the router reads the previous MoE layer's routing of the same tokens
            (`RoutingContext.previous`: the recurrent router's GRU state).
        needs_token_ids: the router routes by token id (`RoutingContext.token_ids`: hash).
        token_local: a token's routing depends on that token alone (and its own sequence), never on the
            other rows of the batch, and every batch statistic the router keeps (balance losses, bias
            loads) goes through `moekit.routing.scope`; so a batch split over ranks (expert parallelism)
            routes as the whole batch would. False for expert choice and capacity-limited routers.
    """

    variable_k: bool = False
    token_local: bool = False
    needs_full_sequence: bool = False
    needs_previous: bool = False
    needs_token_ids: bool = False

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        k: int | None = None,
        gate_outputs: int | None = None,
        losses: dict[str, float] | None = None,
        routed_scale: float | None = None,
        selection_bias: bool | None = None,
        bias_update_rate: float | None = None,
    ) -> None:
        super().__init__()
        who = self.who
        check_positive_ints(f"{who}: ", dim=dim, num_experts=num_experts)
        if k is not None:
            check_k(k, num_experts, who)
            self.k = k
        losses = dict(losses or {})
        check_nonnegative(who, **losses)
        self.dim = dim
        self.num_experts = num_experts
        self.loss_names = tuple(losses)
        for name, v in losses.items():
            setattr(self, name, v)
        if gate_outputs is not None:
            self.weight = nn.Parameter(torch.empty(gate_outputs, dim))
            nn.init.normal_(self.weight, std=1.0 / math.sqrt(dim))
        if routed_scale is not None:
            if isinstance(routed_scale, bool) or not isinstance(routed_scale, int | float) or not (
                math.isfinite(routed_scale) and routed_scale > 0
            ):
                raise ValueError(f"{who}: routed_scale must be a finite number > 0, got {routed_scale!r}")
            self.routed_scale = routed_scale
        if bias_update_rate is not None:
            check_nonnegative(who, bias_update_rate=bias_update_rate)
            self.bias_update_rate = bias_update_rate
        if selection_bias is not None:
            if not isinstance(selection_bias, bool):
                raise ValueError(f"{who}: selection_bias must be True or False, got {selection_bias!r}")
            self.selection_bias = selection_bias
            if selection_bias:
                self.register_buffer("e_score_correction_bias", torch.zeros(gate_outputs or num_experts))

    @property
    def has_selection_bias(self) -> bool:
        """Whether the router chooses experts by scores plus the balancing bias `e_score_correction_bias`."""
        return isinstance(getattr(self, "e_score_correction_bias", None), Tensor)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep the selection bias in float32 when the module is cast (as HF's _keep_in_fp32_modules_strict):
        # updates of ~1e-3 vanish in bf16 once |b| grows past ~0.25. Moves to other devices still apply.
        if not self.has_selection_bias:
            return super()._apply(fn, recurse)
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        device = self.e_score_correction_bias.device
        self.e_score_correction_bias = bias.to(device=device, dtype=torch.float32)
        return self

    def scale_weights(self, weights: Tensor) -> Tensor:
        """weights [T, k] times `routed_scale` (unchanged, not even multiplied, when it is 1 or unset)."""
        scale = getattr(self, "routed_scale", 1.0)
        return weights if scale == 1 else weights * scale

    def biased(self, scores: Tensor) -> Tensor:
        """scores [T, E] (float32) plus the selection bias, for choosing experts only; unchanged without one."""
        return scores + self.e_score_correction_bias.float() if self.has_selection_bias else scores

    def maybe_update_bias(self, expert_ids: Tensor) -> None:
        """In training mode, with a selection bias and `bias_update_rate` > 0: `update_bias(expert_ids)`."""
        if self.training and self.has_selection_bias and getattr(self, "bias_update_rate", 0.0):
            self.update_bias(expert_ids)

    @torch.no_grad()
    def update_bias(self, expert_ids: Tensor) -> None:
        """b_i += bias_update_rate * sign(mean load - load_i), loads counted from expert_ids [T, k] over
        this call's tokens (ids < 0, empty slots, are not counted; under data parallelism, per rank; inside a
        `batch_scope`, expert parallelism, over the batch all its ranks hold)."""
        b = self.e_score_correction_bias
        load = torch.bincount(expert_ids.reshape(-1) + 1, minlength=b.numel() + 1)[1:].float()  # [E], -1 dropped
        load = batch_sum(load)
        delta = torch.sign(load.mean() - load) * self.bias_update_rate
        b.add_(delta.to(b.dtype))

    @property
    def who(self) -> str:
        """The class name, for error messages."""
        return type(self).__name__

    @property
    def nominal_k(self) -> int:
        """Experts per token this router asks for at inference (its `k`; 1 for routers without one).
        Routers whose k is not an attribute `k` override it; for variable-k routers it is a bound."""
        k = getattr(self, "k", None)
        return k if is_positive_int(k) else 1

    def checked_input(self, x: Tensor, like: Tensor) -> Tensor:
        """x checked to be [T, D] floating (`check_input`), in the dtype of the parameter `like`
        (routers compute in their own weights' dtype; the weights they return go back to x's)."""
        check_input(x, self.dim, self.who)
        return x.to(like.dtype)

    def gate_logits(self, x: Tensor) -> Tensor:
        """[T, D] -> [T, E] raw scores of the linear gate, checked for NaN/inf."""
        logits = torch.nn.functional.linear(self.checked_input(x, self.weight), self.weight)
        check_logits(logits, self.who)
        return logits

    def config(self) -> dict[str, Any]:
        """JSON-ready {"name", "args"} that `router_from_config` turns back into this router."""
        return router_config(self)

    def extra_repr(self) -> str:
        args = self.config()["args"]
        return ", ".join(f"{k}={v!r}" for k, v in args.items())
