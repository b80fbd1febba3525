"""Expert-cache simulation over a routing trace: what hit rate would an offloaded model see?

Each MoE layer has its own cache of C = m x k experts (k: the trace's experts per token). Tokens are
replayed in trace order (sequence, then position); a token asks for its k experts of that layer at
once (all must be resident together, so none of them is evicted for another). Reported per layer and
over all layers, for each multiple m:

- each registered eviction policy (`moekit.infer.policies`: LRU, LFU), the very code the live cache runs;
- `<policy>+prefetch`: before a token's request at layer l+1, the experts its layer-l choices predict
  by inter-layer affinity (ExFlow; P(j | i) counted on the same trace, an in-sample calibration) are
  loaded, as `moekit.infer.offload`'s prefetcher does (the first layer, with no layer before it, is
  served without prefetch). Prefetched experts that are then used count as
  hits, so this may exceed Belady's bound, which is for demand loading;
- `belady`: Belady's offline optimum (Belady 1966, "A study of replacement algorithms for a virtual-
  storage computer"): on a miss, evict the expert whose next use is farthest away. No demand-loading
  policy hits more often on the same trace;
- `sch`: SCH(L, m) of `moekit.analyze` (Liang et al. 2025, "Not All Models Suit Expert Offloading"),
  the hit rate of the best fixed cache chosen per segment of L tokens, for comparison with the
  paper's numbers ("SCH's optimum"); it is not a bound on an online cache across segments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moekit.analyze.metrics.coactivation import pair_counts
from moekit.analyze.metrics.locality import sch_from_counts, segment_counts
from moekit.infer.policies import build_policy, list_policies


def _rows(experts: np.ndarray) -> list[list[int]]:
    """[N, k] ids -> per token, its distinct experts (empty slots dropped), in slot order."""
    return [list(dict.fromkeys(int(e) for e in row if e >= 0)) for row in experts]


def replay(
    requests: Sequence[Sequence[int]],
    capacity: int,
    policy: str,
    prefetch: Sequence[Sequence[int]] | None = None,
) -> tuple[int, int]:
    """(hits, requests) of a cache of `capacity` experts under `policy` over `requests` (per token, the
    experts it needs together). `prefetch[t]`: experts loaded just before token t's request (a prefetch
    never evicts to make room beyond the policy's choice, and skips an expert already resident)."""
    pol = build_policy(policy)
    resident: set[int] = set()
    hits = total = 0
    for t, row in enumerate(requests):
        if prefetch is not None:
            for e in prefetch[t]:
                if e in resident:
                    continue
                if len(resident) >= capacity:
                    v = pol.victim()
                    pol.remove(v)
                    resident.discard(v)
                pol.insert(e, demand=False)
                resident.add(e)
        need = set(row)
        for e in row:
            total += 1
            if e in resident:
                hits += 1
                pol.access(e)
                continue
            if len(resident) >= capacity:
                v = pol.victim(protected=need)
                if v is None:
                    raise ValueError(f"cache of {capacity} experts cannot hold a token's {len(need)} experts")
                pol.remove(v)
                resident.discard(v)
            pol.insert(e, demand=True)
            resident.add(e)
    return hits, total


def belady(requests: Sequence[Sequence[int]], capacity: int) -> tuple[int, int]:
    """(hits, requests) of Belady's optimal eviction (farthest next use) with `capacity` experts."""
    n = len(requests)
    nxt: list[dict[int, int]] = [dict() for _ in range(n)]  # token t, expert e -> next token > t using e
    upcoming: dict[int, int] = {}
    for t in range(n - 1, -1, -1):
        nxt[t] = dict(upcoming)
        for e in requests[t]:
            upcoming[e] = t
    resident: set[int] = set()
    hits = total = 0
    for t, row in enumerate(requests):
        need = set(row)
        for e in row:
            total += 1
            if e in resident:
                hits += 1
                continue
            if len(resident) >= capacity:
                cands = [r for r in resident if r not in need]
                if not cands:
                    raise ValueError(f"cache of {capacity} experts cannot hold a token's {len(need)} experts")
                v = max(cands, key=lambda r: nxt[t].get(r, n))
                resident.discard(v)
            resident.add(e)
    return hits, total


def predicted(prev: np.ndarray, P: np.ndarray, k: int) -> list[list[int]]:
    """Per token, the k experts with the largest sum_i P(j | i) over its previous-layer experts i ([N, k])."""
    out = []
    for row in prev:
        chosen = row[row >= 0]
        if chosen.size == 0:
            out.append([])
            continue
        score = P[chosen].sum(axis=0)
        order = np.argsort(-score, kind="stable")[:k]
        out.append([int(j) for j in order if score[j] > 0])
    return out


def cache_simulation(
    trace,
    *,
    multiples: Sequence[int] = (1, 2, 4),
    policies: Sequence[str] | None = None,
    prefetch: bool = True,
    segment_length: int = 16,
) -> dict:
    """Hit rates of every policy (and with prefetch), Belady and SCH at caches of m x k experts per layer.

    trace: a `moekit.analyze.table.Trace` or the path of a trace.parquet. Returns {"k", "num_experts",
    "segment_length", "layers": {layer: {m: {name: hit rate}}}, "overall": {m: {name: hit rate}}} (overall:
    hits over requests of all layers; SCH averaged over layers weighted by activations)."""
    from moekit.analyze.table import Trace

    t = trace if isinstance(trace, Trace) else Trace(trace)
    E, k = t.num_experts, t.k
    policies = list(policies or list_policies())
    layers: dict[int, dict] = {}
    sums: dict[int, dict[str, list[float]]] = {m: {} for m in multiples}
    prev = None
    for layer in t.layers:
        r = t.layer(layer)
        reqs = _rows(r.experts)
        pf = None
        if prefetch and prev is not None and prev.experts.shape == r.experts.shape and np.array_equal(prev.seq, r.seq):
            C = pair_counts(prev.experts, r.experts, E).astype(np.float64)
            pf = predicted(prev.experts, C / np.maximum(C.sum(axis=1, keepdims=True), 1), k)
        counts = segment_counts(r.experts, r.seq, segment_length, E)
        acts = int(counts.sum())
        res: dict[int, dict[str, float | None]] = {}
        for m in multiples:
            cap = m * k
            row: dict[str, float | None] = {}
            for name in policies:
                h, n = replay(reqs, cap, name)
                row[name] = h / n if n else None
                sums[m].setdefault(name, [0, 0])
                sums[m][name][0] += h
                sums[m][name][1] += n
                if prefetch:  # a layer with no predictor (the first) is served as without prefetch
                    if pf is not None:
                        h, n = replay(reqs, cap, name, prefetch=pf)
                    row[f"{name}+prefetch"] = h / n if n else None
                    sums[m].setdefault(f"{name}+prefetch", [0, 0])
                    sums[m][f"{name}+prefetch"][0] += h
                    sums[m][f"{name}+prefetch"][1] += n
            h, n = belady(reqs, cap)
            row["belady"] = h / n if n else None
            sums[m].setdefault("belady", [0, 0])
            sums[m]["belady"][0] += h
            sums[m]["belady"][1] += n
            sch = sch_from_counts(counts, cap)
            row["sch"] = sch
            if sch is not None and not np.isnan(sch):
                sums[m].setdefault("sch", [0, 0])
                sums[m]["sch"][0] += sch * acts
                sums[m]["sch"][1] += acts
            res[m] = row
        layers[layer] = res
        prev = r
    overall = {m: {name: (h / n if n else None) for name, (h, n) in s.items()} for m, s in sums.items()}
    return {"k": k, "num_experts": E, "segment_length": segment_length, "layers": layers, "overall": overall}


def format_table(sim: dict) -> str:
    """A plain-text table of the overall hit rates: one row per multiple m, one column per method."""
    names = list(dict.fromkeys(n for row in sim["overall"].values() for n in row))
    head = f"{'cache':>12} " + " ".join(f"{n:>13}" for n in names)
    lines = [f"hit rate, caches of m x k experts per layer (k={sim['k']}, E={sim['num_experts']})", head]
    for m, row in sim["overall"].items():
        cells = " ".join(f"{row[n]:>13.3f}" if row.get(n) is not None else f"{'n/a':>13}" for n in names)
        label = f"{m}k = {m * sim['k']}"
        lines.append(f"{label:>12} {cells}")
    return "\n".join(lines)


__all__ = ["belady", "cache_simulation", "format_table", "predicted", "replay"]
