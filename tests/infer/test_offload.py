"""Offloaded experts: identical logits and greedy tokens to the resident model, the byte budget, counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moekit.analyze.table import write_trace
from moekit.infer import ExpertCache, load_offloaded, parse_memory
from moekit.infer.offload import ExpertLayout, SafetensorsExperts

EXPERT_BYTES = (2 * 16 * 32 + 32 * 16) * 4  # gate_up [2F, D] + down [D, F], float32
ALL_EXPERTS = 3 * 8 * EXPERT_BYTES


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_equals_resident(tiny_run, policy, prefetch):
    run, ref = tiny_run
    ids = torch.randint(0, 272, (2, 12))
    model = load_offloaded(run, expert_memory="25%", policy=policy, prefetch=prefetch)
    try:
        assert torch.equal(model(ids).logits, ref(ids).logits)
        assert torch.equal(model.generate(ids[:1], 12), ref.generate(ids[:1], 12))
        model.offloader.wait()
    finally:
        model.offloader.close()
    s = model.offloader.stats
    assert s.misses > 0 and s.hits > 0
    assert s.peak_bytes <= model.offloader.cache.capacity_bytes == ALL_EXPERTS // 4
    assert s.bytes_loaded == (s.misses + s.prefetches) * EXPERT_BYTES
    assert (s.prefetches > 0) == prefetch


def test_no_expert_weights_resident(tiny_run):
    run, ref = tiny_run
    model = load_offloaded(run, expert_memory=3 * EXPERT_BYTES)
    names = [n for n, _ in model.named_parameters()]
    assert not any(".experts." in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in ref.named_parameters() if ".experts." not in n
    )


def test_full_budget_loads_each_expert_once(tiny_run):
    run, _ = tiny_run
    model = load_offloaded(run, expert_memory="100%")
    ids = torch.randint(0, 272, (4, 16))
    model(ids)
    model(ids)
    s = model.offloader.stats
    assert s.evictions == 0 and s.misses <= 24 and s.bytes_loaded == s.misses * EXPERT_BYTES
    before = (s.hits, s.misses)
    model(ids)
    assert s.misses == before[1] and s.hits > before[0]


def test_budget_smaller_than_k_experts_is_an_error(tiny_run):
    run, _ = tiny_run
    with pytest.raises(ValueError, match=r"k=2 active experts"):
        load_offloaded(run, expert_memory=2 * EXPERT_BYTES - 1)
    load_offloaded(run, expert_memory=2 * EXPERT_BYTES)  # exactly k experts is enough


def test_parse_memory():
    assert parse_memory("200MB", 10) == 200_000_000
    assert parse_memory("1GiB", 10) == 2**30
    assert parse_memory("50%", 1000) == 500
    assert parse_memory("0.25", 1000) == 250
    assert parse_memory(0.5, 1000) == 500
    assert parse_memory(4096, 10) == 4096
    for bad in ("lots", "0%", "150%", -3, 0, "1.5"):
        with pytest.raises(ValueError, match="expert_memory"):
            parse_memory(bad, 1000)


def _count_cache(capacity, policy="lru"):
    loads = []

    def loader(key):
        loads.append(key)
        return (torch.zeros(25),)  # 100 bytes

    return ExpertCache(capacity_bytes=capacity, policy=policy, loader=loader, entry_bytes=lambda k: 100), loads


def test_cache_lru_and_lfu_evict_as_defined():
    lru, loads = _count_cache(250)
    for k in [(0, 1), (0, 2), (0, 1), (0, 3)]:  # 3 evicts 2 (least recent)
        with lru.use(k):
            pass
    assert (0, 1) in lru and (0, 2) not in lru and (0, 3) in lru
    assert lru.stats.hits == 1 and lru.stats.misses == 3 and lru.cached_bytes == 200 == lru.stats.peak_bytes
    lfu, _ = _count_cache(250, "lfu")
    for k in [(0, 1), (0, 1), (0, 2), (0, 3)]:  # 3 evicts 2 (used once, 1 used twice)
        with lfu.use(k):
            pass
    assert (0, 1) in lfu and (0, 2) not in lfu


def test_cache_never_evicts_pinned_and_fails_clearly():
    cache, _ = _count_cache(100)
    cache.acquire((0, 1))
    with pytest.raises(RuntimeError, match="full of experts in use"):
        cache.acquire((0, 2))
    cache.release((0, 1))
    assert cache.prefetch((0, 2)) and cache.stats.prefetches == 1
    with cache.use((0, 2)):
        pass
    assert cache.stats.prefetch_hits == 1


def test_safetensors_reader_reads_one_expert(tiny_run):
    run, ref = tiny_run
    lay = ExpertLayout(fused=("layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj"))
    r = SafetensorsExperts.single_file(run / "checkpoint" / "model.safetensors", {1: lay}, torch.device("cpu"))
    w1, w2 = r.load((1, 5))
    assert torch.equal(w1, ref.layers[1].mlp.experts.gate_up_proj[5]) and w1.shape == (32, 32)
    assert torch.equal(w2, ref.layers[1].mlp.experts.down_proj[5]) and w2.shape == (32, 16)
    assert r.entry_bytes((1, 5)) == EXPERT_BYTES


def test_calibration_trace_seeds_prefetch(tiny_run, tmp_path):
    """A trace where expert i at layer 0 is always followed by i at layer 1: prefetch loads exactly those."""
    run, _ = tiny_run
    n = 6
    rows = {"layer": [], "seq": [], "pos": [], "slot": [], "expert": []}
    for layer in (0, 1, 2):
        for t in range(n):
            for s in range(2):
                rows["layer"].append(layer), rows["seq"].append(0), rows["pos"].append(t)
                rows["slot"].append(s), rows["expert"].append((2 * t + s) % 8)
    trace = write_trace({k: np.array(v) for k, v in rows.items()}, tmp_path / "t.parquet", num_experts=8)
    model = load_offloaded(run, expert_memory="100%", prefetch=True, calibration=trace)
    off = model.offloader
    # tokens route to {2t, 2t+1} mod 8 at every layer: expert 0 is followed by 0 and 1 (each once: t=0, t=4)
    assert off.affinity[0][0].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
    off.before_layer(0, torch.tensor([[0, 1]]))
    off.wait()
    assert (1, 0) in off.cache and (1, 1) in off.cache and off.stats.prefetches == 2
    off.close()


def test_offloaded_under_autocast_matches_loop_backend(tiny_run):
    """Inside torch.autocast (bfloat16 on CPU) the experts run in bfloat16, as the resident `loop` backend does."""
    run, ref = tiny_run
    model = load_offloaded(run, expert_memory="100%")
    ids = torch.randint(0, 272, (1, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype and torch.equal(got, want)
