"""Each routing metric on hand-built traces with answers worked out by hand (or by brute force)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from moekit.analyze.metrics.coactivation import coactivation, interlayer_affinity
from moekit.analyze.metrics.experts import behaviour_experts, super_experts, two_proportion_p
from moekit.analyze.metrics.load import expert_load, load_stats
from moekit.analyze.metrics.locality import local_consistency, sch_from_counts, segment_counts, srp_from_counts
from moekit.analyze.metrics.specialization import mutual_information, specialization
from moekit.analyze.table import Trace, write_trace


def build(
    tmp_path, choices: dict[int, np.ndarray], seq_len: int, labels=None, name="t.parquet", num_experts=None, **extra
) -> Trace:
    """choices: layer -> experts [N, k] (N tokens in sequences of seq_len)."""
    rows: dict[str, list] = {c: [] for c in ("layer", "seq", "pos", "slot", "expert", "token")}
    lab = []
    for layer, ex in choices.items():
        N, k = ex.shape
        for t in range(N):
            for s in range(k):
                rows["layer"].append(layer)
                rows["seq"].append(t // seq_len)
                rows["pos"].append(t % seq_len)
                rows["slot"].append(s)
                rows["expert"].append(int(ex[t, s]))
                rows["token"].append(t % 7)
                if labels is not None:
                    lab.append(labels[t])
    cols = {c: np.array(v) for c, v in rows.items()}
    if labels is not None:
        cols["label"] = lab
    for c, v in extra.items():
        cols[c] = v
    return Trace(write_trace(cols, tmp_path / name, num_experts=num_experts))


def test_srp_is_one_when_every_segment_uses_one_fixed_set(tmp_path):
    ex = np.tile([1, 3], (40, 1))
    tr = build(tmp_path, {0: ex}, seq_len=20)
    res = local_consistency(tr, segment_lengths=(4, 8), cache_multiples=(1,))
    assert res[0]["srp"] == {4: pytest.approx(1.0), 8: pytest.approx(1.0)}
    assert res[0]["sch"][4][1] == pytest.approx(1.0)


def test_srp_hand_computed():
    # one segment of L=2 tokens, k=1: experts 0 then 1 -> counts c = [1, 1]
    # tau = 1/2: S = {0, 1}, M = 2, P = 2 * 2 = 4, A = 2 -> F1 = 4 / 6
    c = np.array([[1, 1, 0]])
    srp, tau = srp_from_counts(c, L=2)
    assert srp == pytest.approx(4 / 6) and tau == pytest.approx(0.5)
    # counts [2, 0]: S = {0} at tau 1: M = 2, P = 2, A = 2 -> 1
    assert srp_from_counts(np.array([[2, 0, 0]]), L=2)[0] == pytest.approx(1.0)


def brute_force_sch(experts: np.ndarray, seq: np.ndarray, L: int, C: int, E: int) -> float:
    hits = total = 0
    for s in range(len(experts) - L + 1):
        if seq[s] != seq[s + L - 1]:
            continue
        seg = experts[s : s + L].reshape(-1)
        seg = seg[seg >= 0]
        best = max(sum(int(x in cache) for x in seg) for cache in itertools.combinations(range(E), C))
        hits += best
        total += len(seg)
    return hits / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sch_equals_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    E, k, N = 5, 2, 30
    experts = np.stack([rng.choice(E, size=k, replace=False) for _ in range(N)])
    experts[rng.random((N, k)) < 0.1] = -1
    seq = np.arange(N) // 15
    for L, C in ((3, 2), (6, 3), (10, 1)):
        c = segment_counts(experts, seq, L, E)
        assert len(c) == 2 * (15 - L + 1)  # segments never cross sequences
        assert sch_from_counts(c, C) == pytest.approx(brute_force_sch(experts, seq, L, C, E))


def test_mi_zero_when_routing_ignores_label(tmp_path):
    ex = np.array([[0], [1], [2], [0], [1], [2]])
    labels = ["a", "a", "a", "b", "b", "b"]
    tr = build(tmp_path, {0: ex}, seq_len=3, labels=labels)
    res = specialization(tr)
    assert res["layers"][0]["mi"] == pytest.approx(0.0, abs=1e-12)


def test_mi_is_label_entropy_when_expert_determines_label(tmp_path):
    ex = np.array([[0], [0], [1], [1]])
    tr = build(tmp_path, {0: ex}, seq_len=2, labels=["a", "a", "b", "b"])
    res = specialization(tr)["layers"][0]
    assert res["mi"] == pytest.approx(math.log(2)) and res["nmi"] == pytest.approx(1.0)
    assert res["top_experts"]["a"][0] == (0, pytest.approx(2.0))
    assert mutual_information(np.array([[3, 1], [1, 3]]))[0] == pytest.approx(
        2 * (3 / 8) * math.log((3 / 8) / 0.25) + 2 * (1 / 8) * math.log((1 / 8) / 0.25)
    )


def test_load_hand_computed(tmp_path):
    ex = np.array([[0, 1], [0, 2], [0, -1], [0, 1]])
    tr = build(tmp_path, {3: ex}, seq_len=4)
    res = expert_load(tr)[3]
    assert res["counts"] == [4, 2, 1] and res["empty_slots"] == 1 and res["empty_frac"] == pytest.approx(1 / 8)
    assert res["max_over_mean"] == pytest.approx(4 / (7 / 3))
    s = load_stats(np.array([5, 5, 5, 5]))
    assert s["cv"] == 0 and s["entropy_norm"] == pytest.approx(1.0) and s["max_over_mean"] == 1.0


def test_coactivation_and_affinity(tmp_path):
    a = np.array([[0, 1], [0, 1], [2, 3], [2, 3]])
    tr = build(tmp_path, {0: a, 1: a[:, ::-1].copy()}, seq_len=4)
    co = coactivation(tr)[0]
    assert co["counts"][0][1] == 2 and co["counts"][0][2] == 0 and co["conditional"][2][3] == 1.0
    aff = interlayer_affinity(tr)["0->1"]
    # successors of 0 are {0, 1} (each 1/2): the top-2 successors hold all mass -> score 1, lift E/k = 2
    assert aff["conditional"][0][0] == 0.5 and aff["score"] == pytest.approx(1.0) and aff["lift"] == pytest.approx(2.0)


def test_affinity_near_k_over_e_for_independent_layers(tmp_path):
    rng = np.random.default_rng(0)
    E = 4
    tr = build(tmp_path, {0: rng.integers(0, E, (4000, 1)), 1: rng.integers(0, E, (4000, 1))}, seq_len=100)
    assert interlayer_affinity(tr)["0->1"]["score"] == pytest.approx(1 / E, abs=0.03)


def test_super_experts_flag_the_outlier(tmp_path):
    ex = np.array([[e] for e in range(8)] * 10)
    out = np.ones(80, dtype=np.float32)
    out[5] = 500.0  # expert 5 once produces an extreme output
    tr = build(tmp_path, {0: ex}, seq_len=8, out_absmax=out)
    res = super_experts(tr, quantile=0.9, ratio=10)
    assert [(s["layer"], s["expert"]) for s in res["super_experts"]] == [(0, 5)]
    tr2 = build(tmp_path, {0: ex}, seq_len=8, name="no_out.parquet")
    assert super_experts(tr2)["available"] is False


def test_behaviour_experts_significance(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    ex = rng.integers(0, 3, (2 * n, 1))
    ex[:n][rng.random(n) < 0.5] = 3  # expert 3 fires for half of set A's tokens, never for B
    labels = ["A"] * n + ["B"] * n
    tr = build(tmp_path, {0: ex}, seq_len=20, labels=labels)
    res = behaviour_experts(tr, "label", "A", "B")
    assert res["significant"][0]["expert"] == 3 and res["significant"][0]["diff"] > 0.4
    assert all(r["expert"] != 3 or r["p_bonferroni"] < 1e-6 for r in res["all"])
    with pytest.raises(ValueError, match="does not occur"):
        behaviour_experts(tr, "label", "A", "C")
    z, p = two_proportion_p(50, 100, 50, 100)
    assert z == 0 and p == 1.0


def test_affinity_pairs_tokens_by_position_when_a_layer_routes_a_subset(tmp_path):
    # layer 0 routes positions 0..3 (experts 0, 0, 1, 1); a mixture-of-depths layer 1 routes positions 1 and 2 only
    cols = {
        "layer": np.array([0, 0, 0, 0, 1, 1]),
        "seq": np.zeros(6, dtype=np.int64),
        "pos": np.array([0, 1, 2, 3, 1, 2]),
        "slot": np.zeros(6, dtype=np.int64),
        "expert": np.array([0, 0, 1, 1, 2, 3]),
        "token": np.arange(6) % 7,
    }
    tr = Trace(write_trace(cols, tmp_path / "mod.parquet"))
    aff = interlayer_affinity(tr)["0->1"]
    assert aff["tokens"] == 2
    # pairs by position: (0 -> 2) at pos 1, (1 -> 3) at pos 2 (row order would give 0 -> 2 and 0 -> 3)
    assert aff["conditional"][0][2] == 1.0 and aff["conditional"][1][3] == 1.0 and aff["score"] == pytest.approx(1.0)


def variable_k_trace(tmp_path, E=8, slots=8, n=400, seed=0) -> tuple[Trace, np.ndarray]:
    """A top-p style trace: every token uses 1 or 2 of E experts, in rows of `slots` slots (-1 = empty)."""
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in (0, 1):
        ex = np.full((n, slots), -1)
        for t in range(n):
            ex[t, : 1 + (t % 2)] = rng.choice(E, size=1 + (t % 2), replace=False)
        layers[layer] = ex
    return build(tmp_path, layers, seq_len=20, num_experts=E), layers[0]


def test_variable_k_trace_uses_measured_experts_per_token(tmp_path):
    tr, ex = variable_k_trace(tmp_path)
    assert tr.slots == 8 and tr.variable_k and tr.experts_per_token == pytest.approx(1.5)
    assert tr.k == 2  # round(1.5): what tokens use, not the 8 slots
    # affinity over independent random layers: the top-2 successors of an expert hold about 2/8 of the mass
    # (not 1.0, which any routing gets when all 8 slots count as k)
    aff = interlayer_affinity(tr)["0->1"]
    assert 0.2 < aff["score"] < 0.45 and aff["lift"] == pytest.approx(aff["score"] / (2 / 8))
    loc = local_consistency(tr, segment_lengths=(4,), cache_multiples=(1, 2, 4))[0]
    # cache of m*k experts: 2 and 4 are informative (< 1), 8 = E holds every expert -> not applicable
    assert 0 < loc["sch"][4][1] < loc["sch"][4][2] < 1 and loc["sch"][4][4] is None
    # the cache of 2 experts: brute force on the same trace
    assert loc["sch"][4][1] == pytest.approx(brute_force_sch(ex, np.arange(len(ex)) // 20, 4, 2, 8))


def test_degenerate_metrics_are_not_applicable(tmp_path):
    # k = 2 of E = 2: every expert is in the top-k successors and in any cache of 2
    tr = build(tmp_path, {0: np.tile([0, 1], (20, 1)), 1: np.tile([1, 0], (20, 1))}, seq_len=10)
    assert interlayer_affinity(tr)["0->1"]["score"] is None
    assert local_consistency(tr, segment_lengths=(4,), cache_multiples=(1,))[0]["sch"][4][1] is None
    assert sch_from_counts(np.array([[3, 1]]), capacity=2) is None


def test_num_experts_comes_from_the_file_when_recorded(tmp_path):
    ex = np.array([[0], [1], [2]])  # experts 3..5 never chosen
    assert build(tmp_path, {0: ex}, seq_len=3, name="a.parquet").num_experts == 3  # inferred
    assert build(tmp_path, {0: ex}, seq_len=3, name="b.parquet", num_experts=6).num_experts == 6
