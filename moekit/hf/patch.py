"""Patch a transformers MoE model in place: each sparse MoE block becomes a moekit `MoE` that shares
the block's tensors (no copy) and reproduces the family's routing.

    model = AutoModelForCausalLM.from_pretrained(path)
    moekit.hf.patch(model)                                  # the family's own routing, moekit parts
    moekit.hf.patch(model, router="topp", router_args={"p": 0.5})   # swap the router by name
    out = model(ids); moekit.hf.routings(model); moekit.hf.aux_loss(model)
    moekit.hf.unpatch(model)                                # the original transformers modules again

The replacement (`PatchedMoE`) registers the moekit parts under the attribute names of the block it
replaces (`gate`, `experts`, `shared_expert`, ...), so the patched model's `state_dict` keys are the
transformers keys and `save_pretrained` / `moekit.hf.save` keep working.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moekit.hf.families import LOSS_ARGS, Family, activation_name, expert_activation, family_for_block, family_names
from moekit.layers import MLP, Experts, MoE
from moekit.routing import Routing, RoutingContext, build_router, router_config
from moekit.utils.deps import require


class _HFNames:
    """Mixin: moekit's part names (`router`, `experts`, `shared_experts`, `shared_expert_gate`) are
    aliases of a transformers block's attribute names (`gate`, `experts`, `shared_expert`, ...), for
    reading, assignment and deletion, so each part is registered once, under its transformers name."""

    def __getattr__(self, name: str) -> Any:
        return super().__getattr__(self.__dict__.get("_hf_names", {}).get(name, name))

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(self.__dict__.get("_hf_names", {}).get(name, name), value)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(self.__dict__.get("_hf_names", {}).get(name, name))


class HFNamedMoE(_HFNames, MoE):
    """A moekit `MoE` whose parts are registered under a transformers block's attribute names (its
    `state_dict` keys are the block's), in the block's order. `forward` is `MoE.forward`."""

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None,
        shared_expert_gate: nn.Module | None,
        family: Family,
        order: list[str],
    ) -> None:
        object.__setattr__(self, "_hf_names", _hf_names(family))  # read by __setattr__ from the first assignment
        super().__init__(router=router, experts=experts, shared_experts=shared_experts)
        if shared_expert_gate is not None:
            self.shared_expert_gate = shared_expert_gate  # Linear(D, 1), sigmoid applied by MoE
        self.__dict__["_modules"] = dict(sorted(self._modules.items(), key=lambda kv: order.index(kv[0])))

    # MoE reads its router(s) from its own table under moekit's names; here they live under the block's.
    @property
    def router(self) -> nn.Module:
        return self._modules[self._hf_names["router"]]

    @property
    def routers(self) -> tuple[nn.Module, ...]:
        return (self.router,)

    @property
    def iterations(self) -> int:
        return 1


def _hf_names(family: Family) -> dict[str, str]:
    """moekit part name -> the family block's attribute name."""
    names = {"router": family.gate, "experts": family.experts}
    if family.shared is not None:
        names["shared_experts"] = family.shared
    if family.shared_gate is not None:
        names["shared_expert_gate"] = family.shared_gate
    return names


class PatchedMoE(_HFNames, nn.Module):
    """A moekit `MoE` standing in for one transformers sparse MoE block.

    The parts (router, experts, shared expert, shared-expert gate) are held once: this module and
    its `moe` (an `HFNamedMoE`) share one table of children, keyed by the block's attribute names
    (`gate`, `experts`, `shared_expert`, ...: the transformers `state_dict` keys). moekit's names
    (`router`, `experts`, `shared_experts`, `shared_expert_gate`) are aliases of those, on both. So
    whatever replaces a part or its tensors (expert-set surgery, `moekit.layers.surgery`) changes what
    the transformers names hold, and `moekit.hf.save` writes it.

    `forward(hidden [B, L, D]) -> [B, L, D]`, what the family's decoder layer expects; the `Routing`
    of the last call is kept in `last_routing`, and its logits [B*L, E] go to transformers when it
    records `router_logits` (`output_router_logits=True`: transformers' own load-balancing loss and
    `aux_loss` then work as on the unpatched model).

    Attributes (plain, not submodules): `moe` (the moekit MoE, returning `(y, Routing)`), `family`,
    `original` (the transformers block, restored by `unpatch`).
    """

    def __init__(self, moe: HFNamedMoE, family: Family, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_hf_names", moe._hf_names)
        self.__dict__["_modules"] = moe._modules  # one table of parts for both modules
        self.__dict__["moe"] = moe
        self.__dict__["family"] = family
        self.__dict__["original"] = original
        self.__dict__["token_ids"] = None  # [B, L] ids of the current forward (set by a hook of `patch`)
        self.__dict__["context"] = None  # the RoutingContext of those ids, built once per forward by the same hook
        self.last_routing: Routing | None = None

    def train(self, mode: bool = True) -> PatchedMoE:
        """Set training mode here, on the parts and on `moe`."""
        super().train(mode)
        self.moe.training = mode
        return self

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """hidden_states: [B, L, D] (or [T, D]) -> same shape; records `last_routing`."""
        ids = self.token_ids
        context = self.context if ids is not None and ids.shape == hidden_states.shape[:-1] else None
        y, routing = self.moe(hidden_states, context=context)
        self.last_routing = routing
        recorded = _transformers_outputs()
        if recorded is not None and "router_logits" in recorded:
            recorded["router_logits"].append(routing.logits.float() if self.family.float32_logits else routing.logits)
        return y

    def extra_repr(self) -> str:
        return f"family={self.family.name!r}, router={type(self.router).router_name!r}"


def patched_layers(model: nn.Module) -> list[PatchedMoE]:
    """Every `PatchedMoE` of `model`, in module order (layer order)."""
    return [m for m in model.modules() if isinstance(m, PatchedMoE)]


def is_patched(model: nn.Module) -> bool:
    """Whether `patch` has replaced blocks of `model`."""
    return bool(patched_layers(model))


def routings(model: nn.Module) -> list[Routing | None]:
    """The `Routing` of every patched layer from the last forward (None for a layer not yet run)."""
    layers = patched_layers(model)
    if not layers:
        raise ValueError("moekit.hf.routings: the model is not patched; call moekit.hf.patch(model) first")
    return [layer.last_routing for layer in layers]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every patched layer's auxiliary losses from the last forward (scaled by their
    coefficients; add it to the LM loss when fine-tuning)."""
    rs = [r for r in routings(model) if r is not None]
    if not rs:
        raise ValueError("moekit.hf.aux_loss: no forward pass since patching; run the model first")
    return torch.stack([r.total_aux() for r in rs]).sum()


@functools.cache
def _output_collector() -> Any:
    """transformers' context variable that holds the outputs a forward records (None if this
    transformers has none): its hooks record the router logits from transformers' router classes,
    which a patched model no longer runs."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers 5.x
        return None
    return _active_collector


def _transformers_outputs() -> dict[str, list] | None:
    """{output name: recorded values} of the transformers forward in progress, or None."""
    collector = _output_collector()
    return collector.get() if collector is not None else None


def _install_output_hooks(model: nn.Module) -> None:
    """Have transformers put its output-recording hooks on `model` now, while the original blocks are
    in place (it installs them once, on the first forward that records outputs: installed while
    patched, the blocks `unpatch` restores would have none)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # pragma: no cover - older transformers 5.x
        return
    if not isinstance(model, PreTrainedModel):
        return
    if any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules()):
        return  # already there (installing again from the top would add a second set)
    maybe_install_capturing_hooks(model)


def _route_in_float32(router: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a family router that keeps float32 routing weights (`Family.float32_weights`):
    the router gets its input [T, D] in float32, so the weights it returns stay float32. Its
    logits are unchanged (the gate casts its input to the gate weight's dtype, or to float32)."""
    x, *rest = args
    return (x.float(), *rest)


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _find_blocks(model: nn.Module) -> tuple[Family, list[tuple[nn.Module, str, nn.Module]]]:
    """(family, [(parent, attribute, block)]) for every sparse MoE block of a covered family."""
    found: list[tuple[nn.Module, str, nn.Module]] = []
    family: Family | None = None
    for parent in model.modules():
        for name, child in parent.named_children():
            fam = family_for_block(type(child).__name__)
            if fam is None:
                continue
            if family is not None and fam is not family:
                raise ValueError(f"moekit.hf.patch: blocks of two families ({family.name}, {fam.name}) in one model")
            family = fam
            found.append((parent, name, child))
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"moekit.hf.patch: no sparse MoE block of a supported family in this {model_type!r} model "
            f"({type(model).__name__}); supported families: {', '.join(family_names())} "
            "(docs/hf.md says why others are not covered)"
        )
    return family, found


def _share(module: nn.Module, name: str, tensor: Tensor) -> None:
    """Make `module.name` the very tensor object `tensor` (a parameter or a buffer)."""
    if isinstance(tensor, nn.Parameter):
        module._buffers.pop(name, None)
        module._parameters[name] = tensor
    else:
        module._parameters.pop(name, None)
        module._buffers[name] = tensor


def build_router_for(
    block: nn.Module, family: Family, config: Any, router: str | None, router_args: dict[str, Any] | None
) -> nn.Module:
    """The moekit router for one block: the family's own routing (router=None; `router_args` then
    override its arguments, e.g. loss coefficients) or the registered router `router`. Tensors of
    the HF gate are shared where the new router has a tensor of the same name and shape."""
    gate = getattr(block, family.gate)
    weight = gate.weight
    E, D = weight.shape
    if router is None:
        name, args = family.router, {**family.router_args(config), **(router_args or {})}
    else:
        name, args = router, dict(router_args or {})
    new = build_router(name, dim=D, num_experts=E, **args)
    new.to(device=weight.device, dtype=weight.dtype)
    for bname in family.unsaved_buffers:
        if bname in new._buffers:
            new._non_persistent_buffers_set.add(bname)
    for tname in family.gate_tensors:
        src = getattr(gate, tname, None)
        dst = getattr(new, tname, None)
        if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
            _share(new, tname, src)
    return new


def _build_layer(block: nn.Module, family: Family, config: Any, router: str | None,
                 router_args: dict[str, Any] | None, backend: str) -> PatchedMoE:
    """The `PatchedMoE` for one block: moekit parts holding the block's own tensors."""
    hf_experts = getattr(block, family.experts)
    gate_up, down = hf_experts.gate_up_proj, hf_experts.down_proj  # [E, 2F, D], [E, D, F]
    E, two_f, D = gate_up.shape
    act, act_args = expert_activation(family, config)
    with torch.device("meta"):  # no allocation: both tensors are replaced by the block's own
        experts = Experts(num_experts=E, dim=D, hidden=two_f // 2, activation=act, activation_args=act_args,
                          backend=backend)
    _share(experts, "gate_up_proj", gate_up)
    _share(experts, "down_proj", down)
    shared = None
    if family.shared is not None:
        hf_shared = getattr(block, family.shared)
        F_shared = hf_shared.gate_proj.weight.shape[0]
        with torch.device("meta"):
            shared = MLP(dim=D, hidden=F_shared, activation=activation_name(config.hidden_act))
        shared.gate_proj, shared.up_proj, shared.down_proj = hf_shared.gate_proj, hf_shared.up_proj, hf_shared.down_proj
    routes = build_router_for(block, family, config, router, router_args)
    if router is None and family.float32_weights:
        routes.register_forward_pre_hook(_route_in_float32)
    moe = HFNamedMoE(
        router=routes,
        experts=experts,
        shared_experts=shared,
        shared_expert_gate=getattr(block, family.shared_gate) if family.shared_gate is not None else None,
        family=family,
        order=list(block._modules),
    )
    return PatchedMoE(moe, family, block)


def patch(
    model: nn.Module,
    *,
    router: str | None = None,
    router_args: dict[str, Any] | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace every sparse MoE block of a transformers `model` with a moekit `MoE`, in place.

    Args:
        model: a transformers model of a covered family (`moekit.hf.family_names()`).
        router: None keeps the family's own routing (same outputs as transformers); a registered
            router name swaps it (its gate weight [E, D] is shared with the original when shapes match).
        router_args: arguments of that router; with router=None they override the family's
            arguments (e.g. `{"load_balance": 0.01, "z_loss": 1e-3}` for fine-tuning losses).
        backend: dispatch backend of the experts (`moekit.layers.list_backends()`).
    Returns the model (patched in place). Patching a patched model replaces its patch: the new
    layers are built on the restored blocks (`unpatch`); if that fails (an unknown router name, a
    bad argument), the error is raised with the previous patch back in place. Nothing is replaced
    until every layer is built.
    """
    require("transformers")
    undo = _unpatch_undoably(model) if is_patched(model) else None
    try:
        family, blocks = _find_blocks(model)
        config = _text_config(model)
        adapters = []
        for _, _, block in blocks:
            adapter = _build_layer(block, family, config, router, router_args, backend)
            adapter.train(block.training)
            adapters.append(adapter)
    except BaseException:
        if undo is not None:
            undo()
        raise
    _install_output_hooks(model)
    for (parent, name, _), adapter in zip(blocks, adapters, strict=True):
        setattr(parent, name, adapter)
    model.__dict__[_HOOK] = model.register_forward_pre_hook(_record_token_ids, with_kwargs=True)
    return model


def _unpatch_undoably(model: nn.Module) -> Callable[[], None]:
    """`unpatch(model)`, returning a function that puts the patched layers (and the config fields
    `unpatch` changed) back."""
    places = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, PatchedMoE)]
    config = _text_config(model)
    try:
        changed = list(config_updates(model))
    except NotExpressible:
        changed = []
    missing = object()
    before = {k: getattr(config, k, missing) for k in changed}
    unpatch(model)

    def undo() -> None:
        for parent, name, layer in places:
            setattr(parent, name, layer)
        for k, v in before.items():
            if v is missing:
                delattr(config, k)
            else:
                setattr(config, k, v)
        model.__dict__[_HOOK] = model.register_forward_pre_hook(_record_token_ids, with_kwargs=True)

    return undo


_HOOK = "_moekit_hf_token_ids_hook"


def _record_token_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Give every patched layer this forward's `input_ids` [B, L] and one `RoutingContext` of them (routers
    that route by token id, e.g. "hash", read `context.token_ids`)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    ids = ids if isinstance(ids, Tensor) and not ids.is_floating_point() else None
    context = None
    if ids is not None:
        context = RoutingContext(seq_len=ids.shape[-1] if ids.dim() == 2 else None, token_ids=ids.reshape(-1))
    for layer in patched_layers(model):
        layer.__dict__["token_ids"] = ids
        layer.__dict__["context"] = context


def _restored_block(layer: PatchedMoE, config: Any, updates: dict[str, Any]) -> nn.Module:
    """The transformers block to put back for one patched layer, holding its current tensors.

    Unchanged experts and routing: the original block object. A changed expert set or routing
    expressible in the family (`updates` differ from `config`): a new block of the same class built
    from the updated config, its tensors assigned from the patched layer (no copy). A swapped router
    (not expressible): the original block, whose gate tensors the new router shared where it could.
    """
    block = layer.original
    if updates and any(getattr(config, k, None) != v for k, v in updates.items()):
        new_config = copy.deepcopy(config)
        for k, v in updates.items():
            setattr(new_config, k, v)
        with torch.device("meta"):
            block = type(layer.original)(new_config)
        block.load_state_dict(layer.state_dict(), assign=True, strict=True)
    else:
        if layer.experts.num_experts != getattr(layer.original, layer.family.experts).gate_up_proj.shape[0]:
            raise NotExpressible(
                "moekit.hf.unpatch: the experts changed under a router that transformers' "
                f"{layer.family.name} cannot express; patch back with router=None first"
            )
        hf_experts = getattr(block, layer.family.experts)
        _share(hf_experts, "gate_up_proj", layer.experts.gate_up_proj)
        _share(hf_experts, "down_proj", layer.experts.down_proj)
        hf_gate = getattr(block, layer.family.gate)
        for tname in layer.family.gate_tensors:
            t, old = getattr(layer.router, tname, None), getattr(hf_gate, tname, None)
            if isinstance(t, Tensor) and isinstance(old, Tensor) and t.shape == old.shape:
                _share(hf_gate, tname, t)
    block.train(layer.training)
    return block


def unpatch(model: nn.Module) -> nn.Module:
    """Put transformers blocks back in place of the patched layers, holding the current tensors.

    When the expert set or routing changed in a way the family expresses (expert count, top-k,
    ...), the blocks are rebuilt for it and `model.config` is updated (`config_updates`).
    """
    if not is_patched(model):
        raise ValueError("moekit.hf.unpatch: the model is not patched")
    config = _text_config(model)
    try:
        updates = config_updates(model)
    except NotExpressible:
        updates = {}
    places = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, PatchedMoE)]
    restored = [_restored_block(child, config, updates) for _, _, child in places]  # may raise: nothing changed yet
    for (parent, name, _), block in zip(places, restored, strict=True):
        setattr(parent, name, block)
    for k, v in updates.items():
        setattr(config, k, v)
    hook = model.__dict__.pop(_HOOK, None)
    if hook is not None:
        hook.remove()
    return model


class NotExpressible(ValueError):
    """The patched model's routing has no equivalent in its transformers family."""


def config_updates(model: nn.Module) -> dict[str, Any]:
    """HF config fields that describe the patched model's current experts and routing (expert
    count, top-k, ...). Raises `NotExpressible` (with the reason) when the family's transformers
    code cannot reproduce them, or when layers disagree (the HF config is one for all layers)."""
    layers = patched_layers(model)
    if not layers:
        return {}
    config = _text_config(model)
    merged: dict[str, Any] = {}
    for i, layer in enumerate(layers):
        ups = _layer_updates(layer, config)
        for k, v in ups.items():
            if k in merged and merged[k] != v:
                raise NotExpressible(
                    f"patched layer {i} has {k}={v!r} but an earlier layer has {merged[k]!r}; a "
                    f"{layer.family.name} config holds one value for all layers"
                )
            merged[k] = v
    return merged


def _layer_updates(layer: PatchedMoE, config: Any) -> dict[str, Any]:
    fam = layer.family
    rname = type(layer.router).router_name
    if rname != fam.router:
        raise NotExpressible(
            f"router {rname!r} has no equivalent in transformers' {fam.name} (it routes like moekit's "
            f"{fam.router!r}); unpatch, or patch back with router=None, before saving"
        )
    current = router_config(layer.router)["args"]
    defaults = {p.name: p.default for p in inspect.signature(type(layer.router).__init__).parameters.values()}
    native = {**defaults, **fam.router_args(config)}
    ups: dict[str, Any] = {fam.num_experts_key: layer.experts.num_experts}
    for arg, value in current.items():
        if arg in ("dim", "num_experts") or arg in LOSS_ARGS:
            continue
        if arg in fam.config_keys:
            ups[fam.config_keys[arg]] = value
        elif value != native[arg]:
            raise NotExpressible(
                f"{fam.name} routing fixes {arg}={native[arg]!r} but the patched router has {arg}={value!r}"
            )
    return ups

