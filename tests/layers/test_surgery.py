"""Expert-set surgery on moekit layers: keep, merge, replace, add (moekit.layers.surgery).

The contract test over every registered router (tests/routing/test_contract.py) checks that
keep_experts equals masking the removed experts; here: the tensors, merge / replace / add, the
experts variants, the errors."""

from __future__ import annotations

import copy

import pytest
import torch

from moekit.layers import MLP, Experts, MoE, add_experts, keep_experts, merge_experts, replace_expert
from moekit.layers.autonomy import AutonomyExperts
from moekit.layers.duo import DuoExperts
from moekit.layers.film import FiLMExperts
from moekit.layers.hecto import HectoExperts
from moekit.layers.smear import SmearExperts
from moekit.routing import Routing, build_router

D, E, F, T = 16, 8, 12, 20


def layer(router: str = "topk", experts: torch.nn.Module | None = None, **router_args) -> MoE:
    return MoE(router=build_router(router, dim=D, num_experts=E, **router_args),
               experts=experts or Experts(num_experts=E, dim=D, hidden=F)).eval()


def snapshot(moe: MoE) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in moe.state_dict().items()}


def test_keep_slices_every_per_expert_tensor_in_the_given_order():
    moe = layer("deepseek", k=2)
    moe.router.e_score_correction_bias.uniform_(-1, 1)
    old = snapshot(moe)
    ids = [6, 1, 3]  # any order: new expert j is old expert ids[j]
    assert keep_experts(moe, ids) == [[6], [1], [3]]
    new = moe.state_dict()
    for name in ("router.weight", "router.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj"):
        assert torch.equal(new[name], old[name][ids]), name
    assert moe.router.num_experts == moe.experts.num_experts == 3
    assert isinstance(moe.router.weight, torch.nn.Parameter) and moe.router.weight.requires_grad
    assert "e_score_correction_bias" in dict(moe.router.named_buffers())  # still a buffer


def test_keep_with_a_tensor_of_ids_and_a_non_gated_experts():
    moe = layer(experts=Experts(num_experts=E, dim=D, hidden=F, gated=False))
    old = snapshot(moe)
    keep_experts(moe, torch.tensor([0, 5]))
    assert torch.equal(moe.experts.up_proj, old["experts.up_proj"][[0, 5]])
    y, r = moe(torch.randn(T, D))
    assert y.shape == (T, D) and r.num_experts == 2


def test_deepseek_groups_are_kept_or_must_be_given():
    moe = layer("deepseek", k=2, n_group=2, topk_group=1)  # groups {0..3}, {4..7}
    before = snapshot(moe)
    with pytest.raises(ValueError, match="does not keep the 2 groups.*n_group"):
        keep_experts(moe, [0, 1, 2, 4, 5])  # 3 + 2: unequal groups
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())  # nothing changed
    assert moe.router.num_experts == 8
    keep_experts(moe, [0, 1, 3, 4, 6, 7])  # 3 + 3: groups {0,1,2} and {3,4,5}
    assert moe.router.n_group == 2
    keep_experts(moe, [0, 1, 2, 3, 4], router_args={"n_group": 1, "topk_group": 1})
    assert moe.router.n_group == 1 and moe.router.num_experts == 5


def test_null_experts_rows_stay_and_only_real_rows_change():
    moe = layer("null_experts", num_null=2, k=2)
    w = moe.router.weight.detach().clone()  # [E + 2, D]
    keep_experts(moe, [2, 7])
    torch.testing.assert_close(moe.router.weight, torch.cat([w[[2, 7]], w[E:]]), atol=0, rtol=0)
    assert moe.router.num_null == 2 and moe.router.num_experts == 2


def test_attention_router_keeps_q_k_and_v_rows_and_mixture_of_routers_every_sub_router():
    moe = layer("attention")
    w = moe.router.query_key_value.weight.detach().clone()  # [3E, D]
    keep_experts(moe, [1, 4, 6])
    rows = [b * E + i for b in range(3) for i in (1, 4, 6)]
    assert torch.equal(moe.router.query_key_value.weight, w[rows])
    assert moe.router.query_key_value.out_features == 9
    moe = layer("mixture_of_routers", num_routers=3)
    w = moe.router.sub_weight.detach().clone()  # [R, E, D]
    keep_experts(moe, [0, 3])
    assert torch.equal(moe.router.sub_weight, w[:, [0, 3]])


def test_prototype_unconditional_experts_follow():
    moe = layer("prototype", num_uncond=2, k=2)  # experts 6, 7 unconditional
    keep_experts(moe, [0, 2, 3, 7])
    assert moe.router.num_uncond == 1
    with pytest.raises(ValueError, match="unconditional experts .* must stay last"):
        keep_experts(moe, [3, 0, 2])  # the unconditional expert (now 3) not last
    moe = layer("prototype", num_uncond=2, k=2)
    with pytest.raises(ValueError, match="must stay last"):
        merge_experts(moe, [[5, 6]])  # mixes a conditional and an unconditional expert


def test_chain_layer_updates_every_iteration_router():
    chain = MoE(router=[build_router("topk", dim=D, num_experts=E) for _ in range(2)],
                experts=Experts(num_experts=E, dim=D, hidden=F))
    keep_experts(chain, [1, 2, 3])
    assert [r.num_experts for r in chain.routers] == [3, 3] and chain.experts.num_experts == 3
    y, r = chain(torch.randn(2, 5, D))
    assert r.expert_ids.max() < 3


def test_merge_is_the_weighted_average_and_keeps_order():
    moe = layer("deepseek", k=2)
    moe.router.e_score_correction_bias.uniform_(-1, 1)
    old = snapshot(moe)
    sources = merge_experts(moe, [[5, 2], [0, 7]], weights=[[3.0, 1.0], [1, 1]])
    assert sources == [[0, 7], [1], [5, 2], [3], [4], [6]]  # ordered by each group's smallest id
    new = moe.state_dict()
    for name in ("router.weight", "router.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj"):
        o = old[name]
        torch.testing.assert_close(new[name][0], (o[0] + o[7]) / 2, msg=name)
        torch.testing.assert_close(new[name][2], 0.75 * o[5] + 0.25 * o[2], msg=name)
        assert torch.equal(new[name][[1, 3, 4, 5]], o[[1, 3, 4, 6]]), name
    assert moe.router.num_experts == moe.experts.num_experts == 6


def test_merging_an_expert_with_its_copy_is_a_no_op():
    """add_experts(copy) then merge the copy back: every tensor, hence every output, as before."""
    for router in ("topk", "deepseek", "null_experts", "uncertainty"):
        moe = layer(router)
        x = torch.randn(T, D)
        with torch.no_grad():
            want, _ = moe(x)
        old = snapshot(moe)
        add_experts(moe, 1, "copy:3")
        assert moe.router.num_experts == E + 1
        merge_experts(moe, [[3, E]])
        assert all(torch.equal(v, old[k]) for k, v in moe.state_dict().items()), router
        with torch.no_grad():
            torch.testing.assert_close(moe(x)[0], want, atol=0, rtol=0)


def test_merging_identical_experts_gives_that_expert():
    moe = layer()
    with torch.no_grad():
        moe.experts.gate_up_proj[4] = moe.experts.gate_up_proj[1]
        moe.experts.down_proj[4] = moe.experts.down_proj[1]
    old = snapshot(moe)
    merge_experts(moe, [[1, 4]], weights=[[0.3, 0.7]])
    assert torch.allclose(moe.experts.gate_up_proj[1], old["experts.gate_up_proj"][1], atol=1e-7)
    assert torch.allclose(moe.experts.down_proj[1], old["experts.down_proj"][1], atol=1e-7)


def test_replace_then_read_back_with_the_same_tensor_objects():
    moe = layer()
    params = {n: p for n, p in moe.named_parameters()}
    new = {"gate_up_proj": torch.randn(2 * F, D), "down_proj": torch.randn(D, F)}
    replace_expert(moe, 2, new)
    assert all(p is params[n] for n, p in moe.named_parameters())  # in place
    assert torch.equal(moe.experts.gate_up_proj[2], new["gate_up_proj"])
    assert torch.equal(moe.experts.down_proj[2], new["down_proj"])
    mlp = MLP(dim=D, hidden=F)  # the dense layout: expert 5 becomes this MLP
    replace_expert(moe, 5, mlp)
    x = torch.randn(T, D)
    only5 = Routing(torch.full((T, 1), 5), torch.ones(T, 1), torch.zeros(T, E), E)
    with torch.no_grad():
        torch.testing.assert_close(moe.experts(x, only5), mlp(x), atol=1e-5, rtol=1e-5)
    one = Experts(num_experts=1, dim=D, hidden=F)
    replace_expert(moe, 0, one)
    assert torch.equal(moe.experts.down_proj[0], one.down_proj[0])


def test_replace_errors():
    moe = layer()
    with pytest.raises(ValueError, match=r"down_proj of expert 1 must have shape \(16, 12\), got \(12, 16\)"):
        replace_expert(moe, 1, {"gate_up_proj": torch.randn(2 * F, D), "down_proj": torch.randn(F, D)})
    with pytest.raises(ValueError, match=r"expected the tensors \['down_proj', 'gate_up_proj'\]"):
        replace_expert(moe, 1, {"down_proj": torch.randn(D, F)})
    with pytest.raises(ValueError, match="activation 'gelu' differs from the experts' 'silu'"):
        replace_expert(moe, 1, MLP(dim=D, hidden=F, activation="gelu"))
    with pytest.raises(ValueError, match="must hold exactly 1 expert"):
        replace_expert(moe, 1, Experts(num_experts=2, dim=D, hidden=F))
    with pytest.raises(ValueError, match=r"out of range \[0, 8\)"):
        replace_expert(moe, 8, MLP(dim=D, hidden=F))


def test_added_copies_keep_outputs_when_routing_is_unchanged():
    moe = layer()
    x = torch.randn(T, D)
    with torch.no_grad():
        want, r = moe(x)
    assert add_experts(moe, 2, "copy:1")[-2:] == [[1], [1]]
    assert moe.router.num_experts == moe.experts.num_experts == E + 2
    assert torch.equal(moe.router.weight[E], moe.router.weight[1])  # each copy scores as expert 1
    same = Routing(r.expert_ids, r.weights, r.logits, E + 2)  # the old routing over the grown experts
    split = torch.where(r.expert_ids == 1, E + 1, r.expert_ids)  # expert 1's slots sent to its copy
    with torch.no_grad():
        torch.testing.assert_close(moe.experts(x, same), want, atol=0, rtol=0)
        torch.testing.assert_close(moe.experts(x, Routing(split, r.weights, r.logits, E + 2)), want,
                                   atol=1e-6, rtol=1e-6)


def test_added_random_and_zero_experts():
    moe = layer("deepseek")
    twin = copy.deepcopy(moe)
    std = float(moe.experts.gate_up_proj.detach().std())
    add_experts(moe, 3, "random", seed=0)
    new = moe.experts.gate_up_proj[E:]
    assert 0.5 * std < float(new.detach().std()) < 2 * std  # the scale of the existing experts
    add_experts(twin, 3, "random", seed=0)
    assert torch.equal(twin.experts.gate_up_proj[E:], new)  # seeded: reproducible
    assert add_experts(moe, 1, "zeros")[-1] == []
    assert torch.all(moe.experts.down_proj[-1] == 0) and torch.all(moe.router.weight[-1] == 0)
    assert moe.router.e_score_correction_bias.shape == (E + 4,)


def test_validation_leaves_the_global_rng_alone():
    moe = layer()
    state = torch.get_rng_state()
    keep_experts(moe, [0, 1, 2])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cls", [SmearExperts, FiLMExperts])
def test_variants_with_per_expert_tensors(cls):
    experts = cls(num_experts=E, dim=D, hidden=F)
    if cls is FiLMExperts:
        torch.nn.init.normal_(experts.scale)
        torch.nn.init.normal_(experts.shift)
    moe = layer(experts=experts)
    old = copy.deepcopy(moe)
    x = torch.randn(T, D)
    keep_experts(moe, [0, 2, 5])
    with torch.no_grad():
        y, r = moe(x)
        remap = torch.tensor([0, 2, 5])[r.expert_ids]  # the same choices in old ids
        want = old.experts(x, Routing(remap, r.weights, r.logits, E))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_autonomy_router_and_experts_together():
    moe = MoE(router=build_router("autonomy", dim=D, num_experts=E, rank=4),
              experts=AutonomyExperts(num_experts=E, dim=D, hidden=F, rank=4)).eval()
    old = copy.deepcopy(moe)
    x = torch.randn(T, D)
    keep_experts(moe, [1, 3, 4, 6])
    assert moe.router.factor_a.shape == (4, 4, D) and moe.experts.gate_b.shape == (4, F, 4)
    with torch.no_grad():
        y, r = moe(x)
        remap = torch.tensor([1, 3, 4, 6])[r.expert_ids]
        want = old.experts(x, Routing(remap, r.weights, r.logits, E, meta=r.meta))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [DuoExperts, HectoExperts])
def test_variants_without_surgery_say_so(cls):
    moe = MoE(router=build_router("topk", dim=D, num_experts=2, k=1), experts=cls(num_experts=2, dim=D, hidden=F))
    with pytest.raises(NotImplementedError, match=f"experts {cls.__name__} cannot change its expert set"):
        keep_experts(moe, [0])
    with pytest.raises(NotImplementedError, match=cls.__name__):
        add_experts(moe, 1)


@pytest.mark.parametrize("call,match", [
    (lambda m: keep_experts(m, [1, 1, 2]), r"distinct, got \[1\] more than once"),
    (lambda m: keep_experts(m, [0, 8]), r"expert id 8 in ids is out of range \[0, 8\)"),
    (lambda m: keep_experts(m, [-1, 2]), "out of range"),
    (lambda m: keep_experts(m, []), "at least one expert"),
    (lambda m: keep_experts(m, [0.0, 1]), "integer expert ids"),
    (lambda m: keep_experts(m, [True, 1]), "integer expert ids"),
    (lambda m: keep_experts(m, [3]), r"cannot route over the new 1 experts: .*k must be .* got 2"),
    (lambda m: keep_experts(m, [0, 1], router_args={"no_such": 1}), r"has no arguments \['no_such'\]"),
    (lambda m: merge_experts(m, [[0, 1], [1, 2]]), r"in one group once, got \[1\]"),
    (lambda m: merge_experts(m, [[0, 1], []]), "at least one expert id"),
    (lambda m: merge_experts(m, []), "non-empty list"),
    (lambda m: merge_experts(m, [[0, 1]], weights=[[1.0]]), "one weight per member"),
    (lambda m: merge_experts(m, [[0, 1]], weights=[[1.0, -1.0]]), ">= 0 and not all 0"),
    (lambda m: merge_experts(m, [[0, 1]], weights=[[0.0, 0.0]]), ">= 0 and not all 0"),
    (lambda m: merge_experts(m, [list(range(8))]), r"cannot route over the new 1 experts"),
    (lambda m: add_experts(m, 0), "n must be a positive integer"),
    (lambda m: add_experts(m, 1, "copy:9"), "out of range"),
    (lambda m: add_experts(m, 1, "copy:x"), r"init must be one of \['random', 'zeros', 'copy:<i>'\]"),
    (lambda m: add_experts(m, 1, "normal"), "init must be one of"),
])
def test_bad_arguments_are_clear_errors_and_change_nothing(call, match):
    moe = layer(k=2)
    before = snapshot(moe)
    with pytest.raises(ValueError, match=match):
        call(moe)
    assert moe.router.num_experts == moe.experts.num_experts == E
    assert all(torch.equal(v, before[k]) for k, v in moe.state_dict().items())


def test_k_larger_than_the_new_expert_count_names_the_router_field():
    moe = layer("topp", max_k=6)
    with pytest.raises(ValueError, match=r"TopPRouter \('topp'\) cannot route over the new 4 experts: .*max_k"):
        keep_experts(moe, [0, 1, 2, 3])
    keep_experts(moe, [0, 1, 2, 3], router_args={"max_k": 3})
    assert moe.router.max_k == 3


def test_not_an_moe_layer():
    with pytest.raises(TypeError, match="expected an MoE layer"):
        keep_experts(torch.nn.Linear(2, 2), [0])
