"""`--set` overrides: types checked against the config fields, a new router starts from its defaults."""

from __future__ import annotations

import pytest

from moekit.data import DataConfig
from moekit.models.presets import preset
from moekit.train import TrainConfig
from moekit.train.overrides import apply_overrides


def configs():
    return {"model": preset("tiny-moe"), "train": TrainConfig(), "data": DataConfig()}


def test_values_of_the_wrong_type_name_the_field():
    for pair, msg in (('lr="fast"', "train.lr expects float, found 'fast' (str)"),
                      ("steps=2.5", "train.steps expects int"),
                      ("tie_embeddings=1", "model.tie_embeddings expects bool"),
                      ("capacity_factor=big", "model.capacity_factor expects float | None"),
                      ("router_args=3", "model.router_args expects dict")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
            apply_overrides(configs(), [pair])
    out = apply_overrides(configs(), ["lr=1", "capacity_factor=null", "spec=[\"a.txt\"]"])
    assert out["train"].lr == 1 and out["model"].capacity_factor is None and out["data"].spec[0].endswith("a.txt")


def test_a_new_router_starts_from_its_own_defaults():
    base = configs()
    preset_args = {"k": 2, "routed_scale": 2.0, "load_balance": 0.001}
    assert base["model"].router == "topk" and base["model"].router_args == preset_args
    for pairs in (["router=topp", "router_args.p=0.5"], ["router_args.p=0.5", "router=topp"]):
        assert apply_overrides(base, pairs)["model"].router_args == {"p": 0.5}
    assert apply_overrides(base, ["router=topp"])["model"].router_args == {}
    assert apply_overrides(base, ["router=topp", 'router_args={"p": 0.4, "max_k": 3}'])["model"].router_args == {
        "p": 0.4, "max_k": 3}
    assert apply_overrides(base, ["router=topk", "router_args.noise=0.1"])["model"].router_args == {
        **preset_args, "noise": 0.1}
