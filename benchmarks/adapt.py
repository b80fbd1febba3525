"""Mixtures of LoRA experts against plain LoRA: cost (default) and quality (`--quality`).

Cost: on a small transformers Llama built from a config (hidden 256, 4 layers, CPU, one thread), with every
method's adapters covering the same projections (attention and FFN, rank 8): trainable parameters, training step
time (forward + backward) and KV-cached greedy generation tokens/s, each as a ratio to plain LoRA measured in the
same run. Issue 16's goal: generation with a mixture within 1.3x of plain LoRA's time.

Quality: a small dense moekit LM trained briefly on the built-in domains (or `--run DIR`), then plain LoRA and
each mixture fine-tuned at (roughly) equal trainable parameters (each method's rank chosen to match plain LoRA's
count) and equal steps on the same domains, over the seeds given; per-domain validation loss, mean and spread
(max - min over seeds). A gap to plain LoRA smaller than twice the larger spread is reported as "not seen".

    python benchmarks/adapt.py                        # cost, ~1 minute
    python benchmarks/adapt.py --quality              # quality, a few minutes
    python benchmarks/adapt.py --quality --run runs/dense --json out.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

from moekit.adapt import adapted_layers, attach, aux_loss, method_config  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# every method covers all seven projections: MixLoRA's expert FFNs plus its attention LoRA
METHODS = {"lora": {"targets": TARGETS}, "mixlora": {"num_experts": 8, "k": 2},
           "mixlora-proj": {"num_experts": 8, "k": 2, "targets": TARGETS},
           "hydralora": {"num_experts": 4, "targets": TARGETS}, "smora": {"k": 4, "targets": TARGETS},
           "loramoe": {"num_experts": 6, "targets": TARGETS}}


def base_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return tf.LlamaForCausalLM(cfg).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quality", action="store_true", help="the quality comparison instead of the cost one")
    ap.add_argument("--run", type=Path, help="--quality: a dense moekit run (default: train tiny-dense briefly)")
    ap.add_argument("--base-steps", type=int, default=150, help="--quality: steps of the base LM when trained here")
    ap.add_argument("--steps", type=int, default=40, help="--quality: fine-tuning steps per method and seed")
    ap.add_argument("--lr", type=float, default=3e-3, help="--quality: fine-tuning learning rate (AdamW)")
    ap.add_argument("--rank", type=int, default=8, help="--quality: plain LoRA's rank (the parameter budget)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quality:
        from adapt_quality import quality

        # LoRAMoE without its constraint too: var/mean grows with the tokens per sample (see docs/adapt.md)
        rows = quality(args, METHODS | {"loramoe beta=0": {**METHODS["loramoe"], "method": "loramoe", "beta": 0.0}})
        if args.json:
            write_json(args.json, {"environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
                                   "results": rows})
        return
    base = base_model()
    ids = torch.randint(3, 512, (4, 128))
    prompt = ids[:1, :16]
    rows, fns = {}, {}
    variants = [(n, n, False) for n in METHODS] + [(f"{n} (dense path)", n, True) for n in ("mixlora", "mixlora-proj")]
    for label, name, dense in variants:
        kw = METHODS[name]
        rank = 16 if name == "smora" else 8
        model = attach(copy.deepcopy(base), method_config(name, rank=rank, **kw))
        if dense:  # the reference path: every expert computed and weighted, also for one generated token
            for _, layer in adapted_layers(model):
                layer.sparse_max_slots = 0

        def step(model=model):
            out = model(ids, labels=ids)
            aux = aux_loss(model)
            (out.loss + (aux if aux is not None else 0)).backward()

        def gen(model=model):
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)

        fns[label] = (step, gen)
        rows[label] = {"rank": rank, **{k: v for k, v in kw.items() if k != "targets"},
                       "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        step(), gen()  # warm-up
    times: dict[str, dict[str, list[float]]] = {k: {"step": [], "gen": []} for k in rows}
    for _ in range(args.repeats):  # round-robin, so the machine's drifting load hits every method alike
        for label, (step, gen) in fns.items():
            for what, fn in (("step", step), ("gen", gen)):
                t0 = time.perf_counter()
                fn()
                times[label][what].append(time.perf_counter() - t0)
    for label, r in rows.items():
        r["train_step_s"] = statistics.median(times[label]["step"])
        r["gen_tokens_per_s"] = args.new_tokens / statistics.median(times[label]["gen"])
    ref = rows["lora"]
    print(f"{'method':26s} {'trainable':>10s} {'step s':>8s} {'x lora':>7s} {'gen tok/s':>10s} {'time x lora':>11s}")
    for name, r in rows.items():
        r["train_step_ratio"] = r["train_step_s"] / ref["train_step_s"]
        r["gen_time_ratio"] = ref["gen_tokens_per_s"] / r["gen_tokens_per_s"]
        print(f"{name:26s} {r['trainable']:10,d} {r['train_step_s']:8.3f} {r['train_step_ratio']:7.2f} "
              f"{r['gen_tokens_per_s']:10.1f} {r['gen_time_ratio']:11.2f}")
    if args.json:
        write_json(args.json, {"environment": environment(), "args": vars(args) | {"json": str(args.json)},
                               "results": rows})


if __name__ == "__main__":
    main()
