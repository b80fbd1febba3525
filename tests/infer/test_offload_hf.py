"""Offloaded experts in patched Hugging Face models (hub per-expert layout): identical to the patched resident model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from moekit.hf import patch  # noqa: E402
from moekit.infer.offload_hf import load_offloaded_hf  # noqa: E402
from moekit.infer.steer import steer  # noqa: E402
from tests.hf.tiny import tiny_model  # noqa: E402

EXPERT_BYTES = 3 * 16 * 32 * 4  # gate, up [F, D], down [D, F]; F=16, D=32, float32


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def hf_pair(request, tmp_path_factory):
    ref = tiny_model(request.param)
    out = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(str(out))  # the hub layout: one tensor per expert and projection
    plain = tiny_model(request.param)
    patch(ref)
    return out, ref, plain


def test_offloaded_hf_equals_patched_resident(hf_pair):
    path, ref, plain = hf_pair
    model = load_offloaded_hf(path, expert_memory="50%", policy="lfu", prefetch=True,
                              attn_implementation="eager", experts_implementation="eager")
    ids = torch.randint(3, 96, (2, 10))
    try:
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
            torch.testing.assert_close(got, plain(ids).logits, atol=1e-5, rtol=1e-5)  # the unpatched model too
        assert torch.equal(got, want)
        g = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
        assert torch.equal(g, ref.generate(ids[:1], max_new_tokens=8, do_sample=False))
        model.offloader.wait()
    finally:
        model.offloader.close()
    s = model.offloader.stats
    cap = model.offloader.cache.capacity_bytes
    assert cap == 2 * 8 * EXPERT_BYTES // 2 and 0 < s.peak_bytes <= cap
    assert not any(".experts." in n for n, _ in model.named_parameters())
    assert s.misses > 0 and s.bytes_loaded == (s.misses + s.prefetches) * EXPERT_BYTES


def test_offloaded_hf_steering_and_budget_error(hf_pair):
    path, ref, _ = hf_pair
    with pytest.raises(ValueError, match="k=2 active experts"):
        load_offloaded_hf(path, expert_memory=EXPERT_BYTES)
    model = load_offloaded_hf(path, expert_memory="25%", attn_implementation="eager", experts_implementation="eager")
    ids = torch.randint(3, 96, (1, 8))
    with steer(model, disable={1: [0, 1, 2, 3, 4, 5]}), steer(ref, disable={1: [0, 1, 2, 3, 4, 5]}):
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        from moekit.hf import routings

        assert sorted(routings(model)[1].expert_ids.unique().tolist()) == [6, 7]
