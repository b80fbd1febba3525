"""Compression of patched Hugging Face MoE models: calibration and every pruning method through the same
`calibrate` / `prune` calls, saved checkpoints transformers reloads with moekit's logits, frequency counts
hand-checked under a forced routing, and bad input that errors and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import moekit.hf as mh  # noqa: E402
from moekit.compress import calibrate, prune  # noqa: E402
from moekit.compress.hf import calibration_tokens, save_hf, split_tokens  # noqa: E402
from moekit.compress.prune import get_method  # noqa: E402
from moekit.layers import keep_experts  # noqa: E402
from moekit.routing import Routing  # noqa: E402
from tests.hf.tiny import tiny_model  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()


@pytest.mark.parametrize("family,method", [("mixtral", "reap"), ("qwen3_moe", "naee"), ("olmoe", "frequency"),
                                           ("deepseek_v3", "reap"), ("deepseek_v3", "naee")])
def test_pruned_model_reloads_in_transformers_with_moekit_logits(family, method, tmp_path):
    model = mh.patch(tiny_model(family))
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        before = model(x).logits
    cal = calibrate(model, batches())
    assert [s.block for s in cal.layers] == ([1] if family == "deepseek_v3" else [0, 1])  # V3: layer 0 dense
    result = prune(model, method, cal, ratio=0.25)
    assert all(len(ids) == 6 for ids in result.kept.values())
    for layer in mh.patched_layers(model):
        assert layer.experts.num_experts == 6 and layer.router.weight.shape[0] == 6
    with torch.no_grad():
        want = model(x).logits
    assert not torch.allclose(want, before, atol=1e-4)  # pruning changed the model
    save_hf(model, tmp_path / "out")
    loaded = reload(tmp_path / "out")
    fam = mh.get_family(family)
    assert getattr(loaded.config, fam.num_experts_key) == 6
    assert loaded.config.num_experts_per_tok == 2
    if family == "deepseek_v3":  # 6 experts cannot keep 4 groups of 2: 3 groups of 2, 2 of them per token
        assert (loaded.config.n_group, loaded.config.topk_group) == (3, 2)
        assert result.router_args == {1: {"n_group": 3, "topk_group": 2}}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, want, **TOL)


def test_deepseek_groups_stay_valid_and_balanced_sets_keep_them(tmp_path):
    """Half the experts: a set with one kept per group would leave groups of 1 (transformers takes a top-2 in
    each group), so the router regroups (2 groups of 2, 1 per token); router_args given are used as they are."""
    model = mh.patch(tiny_model("deepseek_v3"))
    cal = calibrate(model, batches())
    result = prune(model, "frequency", cal, ratio=0.5)
    assert result.router_args == {1: {"n_group": 2, "topk_group": 1}}
    save_hf(model, tmp_path / "half")
    cfg = json.loads((tmp_path / "half" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"]) == (4, 2, 1)
    router = mh.patched_layers(tiny_model_patched := mh.patch(tiny_model("deepseek_v3")))[0].router
    assert router.regroup([[0], [1], [2], [3], [4], [5], [6], [7]]) == {}  # nothing removed: groups kept
    assert router.regroup([[0], [1], [4], [5]]) == {"n_group": 2, "topk_group": 1}
    cal = calibrate(tiny_model_patched, batches())
    result = prune(tiny_model_patched, "frequency", cal, ratio=0.25, router_args={"n_group": 1, "topk_group": 1})
    assert mh.patched_layers(tiny_model_patched)[0].router.n_group == 1
    assert result.router_args == {1: {"n_group": 1, "topk_group": 1}}


class ForcedRouter(nn.Module):
    """Routes token id t to experts (t mod E, (t + 1) mod E), weights 0.75 / 0.25 (a known routing)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, 2

    def forward(self, x, *, context=None):
        t = context.token_ids.reshape(-1)
        ids = torch.stack([t % self.num_experts, (t + 1) % self.num_experts], dim=-1)
        w = torch.tensor([0.75, 0.25], dtype=x.dtype).expand(len(t), 2)
        return Routing(ids, w, x.new_zeros(len(t), self.num_experts), self.num_experts)


def test_frequency_counts_are_the_forced_routing():
    model = mh.patch(tiny_model("mixtral"))
    for layer in mh.patched_layers(model):
        layer.moe.router = ForcedRouter(8)
    ids = torch.tensor([[5, 5, 5, 3], [13, 20, 4, 9]])  # mod 8: 5 5 5 3 | 5 4 4 1
    cal = calibrate(model, [ids])
    # first choices: e5 x4, e3 x1, e4 x2, e1 x1; second choices (+1): e6 x4, e4 x1, e5 x2, e2 x1
    want = torch.tensor([0, 1, 1, 1, 3, 6, 4, 0])
    for stats in cal.layers:
        assert torch.equal(stats.counts, want)
        assert stats.never_routed == [0, 7] and stats.tokens == 8
        assert get_method("frequency")(mh.patched_layers(model)[0].moe, stats, 3, []) == [5, 6, 4]
    assert cal.never_routed == {0: [0, 7], 1: [0, 7]}


def test_reap_saliency_on_a_patched_layer_matches_a_loop():
    """REAP's saliency: mean over routed slots of gate weight x ||expert output||, against a loop over tokens."""
    model = mh.patch(tiny_model("olmoe"))
    x = batches(1)[0]
    cal = calibrate(model, [x], record=("saliency",))
    hidden = {}
    layer = mh.patched_layers(model)[1]

    def grab(module, args, output) -> None:
        hidden["x"] = args[0].reshape(-1, 32)

    handle = layer.register_forward_hook(grab)
    with torch.no_grad():
        model(x)
    handle.remove()
    r = layer.last_routing
    e_up, e_down = layer.experts.gate_up_proj, layer.experts.down_proj
    sal, cnt = torch.zeros(8), torch.zeros(8)
    torch.set_grad_enabled(False)
    for t in range(hidden["x"].shape[0]):
        for slot in range(2):
            e = int(r.expert_ids[t, slot])
            gate, up = (e_up[e] @ hidden["x"][t]).chunk(2)
            y = e_down[e] @ (torch.nn.functional.silu(gate) * up)
            sal[e] += float(r.weights[t, slot]) * float(y.norm())
            cnt[e] += 1
    torch.set_grad_enabled(True)
    torch.testing.assert_close(cal.layers[1].saliency(), sal / cnt.clamp_min(1), atol=1e-5, rtol=1e-5)


def test_bad_input_errors_and_writes_nothing(tmp_path):
    model = mh.patch(tiny_model("mixtral"))
    cal = calibrate(model, batches(1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    for ratio in (0.0, 1.0, 1.5, 0.9):  # 0.9 of 8 removes 7: fewer left than top-2
        with pytest.raises(ValueError, match="ratio|k=2"):
            prune(model, "reap", cal, ratio=ratio)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # nothing changed
    # DeepSeek-V2's config does not store n_group: a pruned set that breaks its groups cannot be saved
    v2 = mh.patch(tiny_model("deepseek_v2"))
    prune(v2, "frequency", calibrate(v2, batches()), ratio=0.25)
    out = tmp_path / "sub" / "v2"
    with pytest.raises(ValueError, match="deepseek_v2 config cannot store"):
        save_hf(v2, out)
    assert not out.exists() and not (tmp_path / "sub").exists()
    # per-layer expert counts: one layer pruned
    keep_experts(mh.patched_layers(model)[0], [0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="mixtral config cannot store .* one value for all layers"):
        save_hf(model, tmp_path / "mixed")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError, match="--force"):
        save_hf(mh.patch(tiny_model("olmoe")), tmp_path)


def test_calibration_tokens_from_files(tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps([[5, 6, 7], [8, 9]]))
    assert calibration_tokens(None, tmp_path / "ids.json")["calib"].tolist() == [5, 6, 7, 8, 9]
    import numpy as np

    np.save(tmp_path / "ids.npy", np.arange(10, dtype=np.int32))
    assert calibration_tokens(None, tmp_path / "ids.npy")["calib"].tolist() == list(range(10))
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match="needs the checkpoint's tokenizer"):
        calibration_tokens(None, tmp_path / "t.txt")
    with pytest.raises(ValueError, match="no tokenizer"):
        calibration_tokens(None, None)
    stream, val = split_tokens({"a": torch.arange(40), "b": torch.arange(5)}, seq_len=4, val_windows=2)
    assert val["a"].tolist() == [list(range(30, 35)), list(range(35, 40))] and "b" not in val
    assert stream.tolist() == list(range(30)) + list(range(5))


OTHER_FAMILIES = ["qwen2_moe", "jamba", "granitemoe", "minimax", "flex_olmo", "mellum", "qwen3_next", "glm4_moe",
                  "glm4_moe_lite", "glm_moe_dsa", "dots1", "deepseek_v32", "solar_open", "hy_v4", "granitemoeshared",
                  "granitemoehybrid", "exaone_moe"]


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_every_other_family_prunes_and_reloads(family, tmp_path):
    model = mh.patch(tiny_model(family))
    b = batches(2)
    prune(model, "reap", calibrate(model, b), ratio=0.25)
    with torch.no_grad():
        want = model(b[0]).logits
    save_hf(model, tmp_path / "o")
    with torch.no_grad():
        torch.testing.assert_close(reload(tmp_path / "o")(b[0]).logits, want, **TOL)


def test_calibration_text_file_uses_the_tokenizer(tmp_path):
    from tests.compress.test_cli_hf import tiny_tokenizer

    tok = tiny_tokenizer()
    (tmp_path / "t.txt").write_text("the quick brown fox")
    ids = calibration_tokens(tok, tmp_path / "t.txt")["calib"]
    assert ids.tolist() == tok("the quick brown fox", add_special_tokens=False)["input_ids"] and len(ids) >= 4
