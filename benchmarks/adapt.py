"""Cost of mixtures of LoRA experts against plain LoRA (quick; speed only, no quality claim).

On a small transformers Llama built from a config (hidden 256, 4 layers, CPU, one thread), with every method's
adapters on the same targets (attention and FFN projections, rank 8): trainable parameters, training step time
(forward + backward) and KV-cached greedy generation tokens/s, each as a ratio to plain LoRA measured in the same
run. Issue 16's goal: generation with a mixture within 1.3x of plain LoRA's time.

    python benchmarks/adapt.py             # ~1 minute
    python benchmarks/adapt.py --json out.json
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

from moekit.adapt import attach, aux_loss, method_config  # noqa: E402

METHODS = {"lora": {}, "mixlora": {"num_experts": 8, "k": 2}, "hydralora": {"num_experts": 4},
           "smora": {"k": 4}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return tf.LlamaForCausalLM(cfg).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = base_model()
    ids = torch.randint(3, 512, (4, 128))
    prompt = ids[:1, :16]
    rows = {}
    for name, kw in METHODS.items():
        rank = 16 if name == "smora" else 8
        model = attach(copy.deepcopy(base), method_config(name, targets=TARGETS, rank=rank, **kw))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def step(model=model):
            out = model(ids, labels=ids)
            aux = aux_loss(model)
            (out.loss + (aux if aux is not None else 0)).backward()

        def gen(model=model):
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)

        rows[name] = {"rank": rank, **kw, "trainable": trainable, "train_step_s": timed(step, args.repeats),
                      "gen_tokens_per_s": args.new_tokens / timed(gen, args.repeats)}
    ref = rows["lora"]
    print(f"{'method':10s} {'trainable':>10s} {'step s':>8s} {'x lora':>7s} {'gen tok/s':>10s} {'time x lora':>11s}")
    for name, r in rows.items():
        r["train_step_ratio"] = r["train_step_s"] / ref["train_step_s"]
        r["gen_time_ratio"] = ref["gen_tokens_per_s"] / r["gen_tokens_per_s"]
        print(f"{name:10s} {r['trainable']:10,d} {r['train_step_s']:8.3f} {r['train_step_ratio']:7.2f} "
              f"{r['gen_tokens_per_s']:10.1f} {r['gen_time_ratio']:11.2f}")
    if args.json:
        write_json(args.json, {"environment": environment(), "args": vars(args) | {"json": str(args.json)},
                               "results": rows})


if __name__ == "__main__":
    main()
