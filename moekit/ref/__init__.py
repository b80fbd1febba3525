"""Reference models: `ref-dense`, `ref-moe`, `ref-moe-fg` (and `ref-dense-4x`) trained on the built-in corpus at a
fixed budget and cached, so that benchmarks of every area evaluate on the same trained models.

    import moekit.ref
    moekit.ref.build(budget="ref")           # or `moekit ref build`; resumable, reuses finished models
    model = moekit.ref.load("ref-moe")       # eval mode; a missing model names the command that builds it
    tok = moekit.ref.load_tokenizer("ref-moe")
"""

from moekit.ref.budgets import ALL_MODELS, BUDGETS, MODELS, RefBudget, model_config, ref_data_config
from moekit.ref.builder import build, run_dir
from moekit.ref.load import built, export_hf, load, load_tokenizer

__all__ = [
    "ALL_MODELS",
    "BUDGETS",
    "MODELS",
    "RefBudget",
    "build",
    "built",
    "export_hf",
    "load",
    "load_tokenizer",
    "model_config",
    "ref_data_config",
    "run_dir",
]
