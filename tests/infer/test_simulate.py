"""Cache simulation: hit rates equal a brute-force replay; Belady is the exhaustive optimum and bounds LRU/LFU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moekit.analyze.table import write_trace
from moekit.cli.main import app
from moekit.infer.simulate import belady, cache_simulation, replay

# one layer, k = 2, E = 5: per token the experts it needs together
REQ = [[0, 1], [2, 3], [0, 1], [1, 4], [0, 2], [3, 4], [0, 1], [2, 3], [1, 0], [4, 2]]


def brute_lru(reqs, cap):
    """LRU by a list, oldest first: the plainest replay."""
    cache, hits, n = [], 0, 0
    for row in reqs:
        for e in row:
            n += 1
            if e in cache:
                hits += 1
                cache.remove(e)
            elif len(cache) >= cap:
                cache.pop(next(i for i, c in enumerate(cache) if c not in row))
            cache.append(e)
    return hits, n


def brute_lfu(reqs, cap):
    """Perfect LFU (frequencies over all history), ties by least recent use."""
    freq, last, cache, hits, n, tick = {}, {}, set(), 0, 0, 0
    for row in reqs:
        for e in row:
            n += 1
            tick += 1
            if e in cache:
                hits += 1
            elif len(cache) >= cap:
                cache.remove(min((c for c in cache if c not in row), key=lambda c: (freq.get(c, 0), last[c])))
            cache.add(e)
            freq[e] = freq.get(e, 0) + 1
            last[e] = tick
    return hits, n


def exhaustive_optimum(reqs, cap):
    """The most hits of any eviction sequence (every choice tried)."""
    flat = [(e, frozenset(row)) for row in reqs for e in row]

    def best(i, cache):
        if i == len(flat):
            return 0
        e, need = flat[i]
        if e in cache:
            return 1 + best(i + 1, cache)
        if len(cache) < cap:
            return best(i + 1, cache | {e})
        return max(best(i + 1, (cache - {v}) | {e}) for v in cache if v not in need)

    return best(0, frozenset())


@pytest.mark.parametrize("cap", [2, 3, 4])
def test_policies_equal_brute_force_and_belady_is_optimal(cap):
    assert replay(REQ, cap, "lru") == brute_lru(REQ, cap)
    assert replay(REQ, cap, "lfu") == brute_lfu(REQ, cap)
    opt, n = belady(REQ, cap)
    assert opt == exhaustive_optimum(REQ, cap)
    assert n == 20 and opt >= replay(REQ, cap, "lru")[0] and opt >= replay(REQ, cap, "lfu")[0]


def test_hand_counted_lru():
    # cap 2: each token's pair replaces the previous one; the only hit is expert 1 of token 3 ([1, 4] after [0, 1])
    assert replay(REQ, 2, "lru") == (1, 20)
    assert replay(REQ, 5, "lru") == (15, 20)  # 5 experts fit: only the 5 cold misses


def test_prefetch_of_the_right_expert_turns_misses_into_hits():
    reqs = [[0], [1], [2], [3]]
    assert replay(reqs, 1, "lru") == (0, 4)
    assert replay(reqs, 1, "lru", prefetch=[[0], [1], [2], [3]]) == (4, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        replay([[0, 1]], 1, "lru")


def _trace(tmp_path):
    """Two layers, E=4, k=1: layer 1 uses (layer 0's expert + 1) mod 4; layer 0 cycles 0, 1, 2, 3."""
    rows = {"layer": [], "seq": [], "pos": [], "slot": [], "expert": []}
    for layer in (0, 1):
        for t in range(16):
            rows["layer"].append(layer), rows["seq"].append(t // 8), rows["pos"].append(t % 8)
            rows["slot"].append(0), rows["expert"].append((t + layer) % 4)
    return write_trace({c: np.array(v) for c, v in rows.items()}, tmp_path / "trace.parquet", num_experts=4)


def test_cache_simulation_on_a_trace(tmp_path):
    sim = cache_simulation(_trace(tmp_path), multiples=(1, 2), segment_length=4)
    assert sim["k"] == 1 and sim["num_experts"] == 4
    one = sim["overall"][1]
    assert one["lru"] == 0.0 and one["lfu"] == 0.0  # a cycle of 4 through 1 slot never hits
    assert one["lru+prefetch"] == pytest.approx(0.5)  # layer 1 is predicted exactly from layer 0: all hits
    assert sim["layers"][1][1]["lru+prefetch"] == 1.0
    assert one["belady"] == 0.0
    two = sim["overall"][2]
    assert two["belady"] >= max(two["lru"], two["lfu"])
    assert one["sch"] == pytest.approx(0.25)  # best fixed 1 of 4 experts per 4-token segment


def test_cache_sim_cli(tmp_path):
    out = tmp_path / "sim.json"
    r = CliRunner().invoke(app, ["cache-sim", str(_trace(tmp_path)), "--multiples", "1,2", "--segment-length", "4",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "belady" in r.output and "lru+prefetch" in r.output
    assert json.loads(out.read_text())["overall"]["1"]["lru"] == 0.0
    bad = CliRunner().invoke(app, ["cache-sim", str(tmp_path / "trace.parquet"), "--multiples", "0"])
    assert bad.exit_code != 0


def test_exhaustive_reference_is_exhaustive():
    # sanity of the reference itself on a case small enough to count by hand: cap 1, [0],[1],[0] -> 0 hits
    assert exhaustive_optimum([[0], [1], [0]], 1) == 0
    assert exhaustive_optimum([[0], [1], [0]], 2) == 1
