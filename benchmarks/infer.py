"""Offloaded generation: tokens/s and peak expert memory of a moekit MoE LM at expert budgets of 25%, 50%
and 100% of all experts, per cache policy (with and without prefetch), against the resident model and
against accelerate's disk offload (`device_map` + `offload_folder`) of the same model's Hugging Face
export at the same memory, all in one process. Offloaded rows start from an empty cache each run (the
cost of a cold start included); `lru (warm)` reuses one offloaded model across runs (a server's steady
state). Every offloaded run's greedy tokens are checked against the resident model's (`exact`).

    python benchmarks/infer.py                                   # random-weight ref-moe shape, quick
    python benchmarks/infer.py --run RUN --trace OUT/trace.parquet     # a trained run and its `moekit analyze` trace
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.infer import load_offloaded  # noqa: E402
from moekit.models import MoELM  # noqa: E402
from moekit.models.presets import preset  # noqa: E402
from moekit.train.checkpoint import checkpoint_dir, load_model, read_meta, save_checkpoint  # noqa: E402


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds and last result of each fn; each round runs every candidate once, so machine noise
    (two training jobs share these cores) hits all of them alike and the ratios hold."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    last: dict[str, object] = {n: fn() for n, fn in fns.items()}  # warm-up round (page cache, first calls)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}, last


def expert_bytes(model: MoELM) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." in n)


def accelerate_generate(model: MoELM, work: Path, budget: int, prompt: torch.Tensor, new: int):
    """accelerate's disk offload of the Mixtral export: max_memory = non-expert bytes + `budget` on the CPU,
    the rest in an offload folder. Returns (greedy generate fn, device map summary)."""
    from transformers import AutoModelForCausalLM

    from moekit.hf.export import export_lm

    hf_dir = work / "hf"
    if not hf_dir.exists():
        export_lm(model, "mixtral", hf_dir)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." not in n)
    hf = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), device_map="auto", max_memory={"cpu": other + budget}, offload_folder=str(work / f"off-{budget}"),
        dtype=torch.float32,
    ).eval()
    where: dict[str, int] = {}
    for v in getattr(hf, "hf_device_map", {}).values():
        where[str(v)] = where.get(str(v), 0) + 1

    def run():
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return out[0, -new:].tolist(), None

    return run, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a moekit run (copied first); default: random ref-moe weights")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default="25,50,100", help="expert budgets in percent")
    ap.add_argument("--no-accelerate", action="store_true")
    ap.add_argument("--trace", type=Path, help="the model's `moekit analyze` trace: adds cache-sim rates")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "infer.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.run is not None:
            shutil.copytree(checkpoint_dir(args.run), work / "run" / "checkpoint")  # a training job may rewrite it
            model = load_model(work / "run").eval()
            source = f"{args.run} (step {read_meta(work / 'run').get('step')})"
        else:
            model = MoELM(preset("ref-moe", vocab_size=2048)).eval()
            save_checkpoint(work / "run", model, {})
            source = "random ref-moe (vocab 2048)"
        cfg = model.config
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
        new = args.new_tokens
        total = expert_bytes(model)
        fns = {("resident", 100): lambda: (model.generate(prompt, new)[0, -new:].tolist(), None)}
        maps = {}
        for pct in [int(b) for b in args.budgets.split(",")]:
            for policy in ("lru", "lfu"):
                for prefetch in (False, True):

                    def run(policy=policy, prefetch=prefetch, pct=pct):  # a cold cache every time
                        m = load_offloaded(work / "run", expert_memory=f"{pct}%", policy=policy, prefetch=prefetch)
                        try:
                            return m.generate(prompt, new)[0, -new:].tolist(), m.offloader.stats
                        finally:
                            m.offloader.close()

                    fns[(policy + ("+prefetch" if prefetch else ""), pct)] = run
            warm = load_offloaded(work / "run", expert_memory=f"{pct}%", policy="lru")
            warm.generate(prompt, new)  # the cache as a long-running server holds it
            fns[("lru (warm)", pct)] = lambda warm=warm: (warm.generate(prompt, new)[0, -new:].tolist(), None)
            if not args.no_accelerate:
                fns[("accelerate-disk", pct)], maps[pct] = accelerate_generate(
                    model, work, total * pct // 100, prompt, new
                )
        secs, last = interleaved(fns, args.repeats)
    ref_tokens = last[("resident", 100)][0]
    rows = []
    for (name, pct), t in secs.items():
        tokens, s = last[(name, pct)]
        row = {"method": name, "budget": pct, "tokens_per_s": new / t, "exact": tokens == ref_tokens,
               "budget_bytes": total * pct // 100}
        if s is not None:
            row.update(peak_expert_bytes=s.peak_bytes, hit_rate=s.hit_rate, prefetch_hits=s.prefetch_hits,
                       bytes_loaded=s.bytes_loaded)
        if name == "accelerate-disk":
            row["device_map"] = maps[pct]
        rows.append(row)
    resident = rows[0]["tokens_per_s"]
    print(f"experts {total / 1e6:.1f} MB, {new} new tokens, median of {args.repeats} interleaved rounds")
    for r in rows:
        r["vs_resident"] = r["tokens_per_s"] / resident
        print(f"{r['method']:>15} @ {r['budget']:3d}%: {r['tokens_per_s']:6.1f} tok/s "
              f"({r['vs_resident']:.2f}x resident), hit rate {r.get('hit_rate', float('nan')):.3f}, "
              f"peak {r.get('peak_expert_bytes', 0) / 1e6:.1f} MB"
              f", exact {r['exact']}")
    for pct in {r["budget"] for r in rows}:
        acc = [r for r in rows if r["method"] == "accelerate-disk" and r["budget"] == pct]
        for r in rows:
            if acc and r["budget"] == pct:
                r["vs_accelerate"] = r["tokens_per_s"] / acc[0]["tokens_per_s"]
    sim = None
    if args.trace is not None:
        from moekit.infer.simulate import cache_simulation, format_table

        sim = cache_simulation(args.trace, multiples=(1, 2, 4))
        print(format_table(sim))
        sim = {"trace": str(args.trace), "k": sim["k"], "overall": sim["overall"]}
    write_json(args.out, {"environment": environment(), "model": source, "prompt_len": args.prompt_len,
                          "new_tokens": new, "expert_bytes": total, "rows": rows, "cache_sim": sim})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
