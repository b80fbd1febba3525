"""`moekit convert btx|prompts|nexus`: compose several dense models (moekit runs or checkpoint folders, or
transformers folders) into one MoE checkpoint, written as `convert_run` writes (a moekit run folder, or a
transformers checkpoint with `hf_family`; atomic, an existing DST refused unless `force`).

- btx SRC...: the branches (>= 2, one seed: `moekit train --init SEED`); DST keeps the seed run's data and train
  configs (all domains) when the seed is a readable run, else the first branch's.
- prompts SRC...: the base model, then the experts; `prompts` holds one list of texts per expert, tokenised with
  the base's `tokenizer.json`.
- nexus SRC...: the seed, then the branches; each branch's domain embedding is the seed's mean final hidden state
  over `calib_batches` batches of the branch run's own training data (`moekit train --init SEED --set
  data.domains=[...]`); DST keeps the seed run's configs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moekit.convert.btx import BTXConfig, btx, check_one_seed
from moekit.convert.nexus import NexusConfig, domain_embedding, nexus
from moekit.convert.prompts import PromptsConfig, prompts_moe
from moekit.convert.run import COMPOSE, ConvertSummary, write_model
from moekit.convert.source import DenseSource, load_dense
from moekit.models import MoELM
from moekit.models.params import count_params


def _tokenize(source: DenseSource, prompts: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    from moekit.data.tokenizer import BPETokenizer

    folder = source.run_dir
    if folder is None and source.origin.startswith("transformers"):
        folder = Path(source.origin.rsplit(" at ", 1)[1])
    path = folder / "tokenizer.json" if folder is not None else None
    if path is None or not path.is_file():
        raise ValueError(f"prompts: the base model {source.origin} has no tokenizer.json to tokenise the prompts")
    tok = BPETokenizer.load(path)
    return [[tok.encode(t) for t in texts] for texts in prompts]


def compose_model(method: str, sources: Sequence[DenseSource], *, btx_cfg: BTXConfig | None = None,
                  prompts_cfg: PromptsConfig | None = None, prompts: Sequence[Sequence[Any]] | None = None,
                  nexus_cfg: NexusConfig | None = None, domain_batches: Sequence[Sequence[Any]] | None = None
                  ) -> tuple[MoELM, ConvertSummary, DenseSource, dict[str, Any]]:
    """(MoE model, summary, the source whose configs DST keeps, the method's config) of `method` over `sources`.
    `prompts` (prompts): one list per expert of texts or token-id lists; `domain_batches` (nexus): one list of
    token-id batches [B, L] per branch."""
    if method not in COMPOSE:
        raise ValueError(f"unknown composition method {method!r}; known: {', '.join(COMPOSE)}")
    models = [s.model for s in sources]
    keep = sources[0]
    if method == "btx":
        cfg: Any = btx_cfg or BTXConfig()
        seed = check_one_seed(sources)
        if seed is not None:
            try:
                keep = load_dense(seed)
            except (OSError, ValueError):
                keep = sources[0]
        model = btx(models, cfg)
        copied = (f"each expert the FFN of one of {len(models)} branches, embeddings/attention/norms averaged over "
                  f"them; routers new (std {cfg.router_std:g})")
    elif method == "prompts":
        cfg = prompts_cfg or PromptsConfig()
        if len(sources) < 2:
            raise ValueError("prompts: give the base model, then at least one expert model")
        if prompts is None:
            raise ValueError("prompts: give one list of prompts per expert (--prompts FILE)")
        ids = [[p if not isinstance(p, str) else None for p in ps] for ps in prompts]
        if any(p is None for ps in ids for p in ps):
            ids = _tokenize(sources[0], prompts)
        model = prompts_moe(models[0], models[1:], ids, cfg)
        copied = (f"embeddings/attention/norms from the base, each expert the FFN of one of {len(models) - 1} "
                  f"models; routers from prompts ({cfg.mode})")
    else:
        cfg = nexus_cfg or NexusConfig()
        if len(sources) < 2:
            raise ValueError("nexus: give the seed model, then at least one branch")
        if domain_batches is None or len(domain_batches) != len(sources) - 1:
            raise ValueError(f"nexus: give one list of token batches per branch ({len(sources) - 1})")
        d = [domain_embedding(models[0], batches) for batches in domain_batches]
        model = nexus(models[1:], d, seed_model=models[0], cfg=cfg)
        copied = (f"each expert the FFN of one of {len(models) - 1} branches, the rest averaged over them"
                  f"{', the seed FFN shared' if cfg.shared_seed else ''}; routers project the branches' domain "
                  "embeddings (the seed's mean final hidden state over each branch's data)")
    c = model.config
    pc = count_params(c)
    summary = ConvertSummary(method, ", ".join(s.origin for s in sources), count_params(models[0].config).total,
                             pc.total, pc.active, c.num_experts, int(c.router_args["k"]), c.expert_hidden,
                             list(range(c.n_layers)), copied)
    return model, summary, keep, asdict(cfg)


def compose_run(method: str, srcs: Sequence[str | Path | MoELM], out: str | Path, *,
                btx_cfg: BTXConfig | None = None, prompts_cfg: PromptsConfig | None = None,
                prompts: Sequence[Sequence[Any]] | None = None, nexus_cfg: NexusConfig | None = None,
                calib_batches: int = 8, hf_family: str | None = None, force: bool = False) -> ConvertSummary:
    """Compose the dense models at `srcs` with `method` and write DST `out` (see the module docstring)."""
    if method not in COMPOSE:
        raise ValueError(f"unknown composition method {method!r}; known: {', '.join(COMPOSE)}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    sources = [load_dense(s) for s in srcs]
    batches = None
    if method == "nexus":
        from moekit.compress.calibrate import calibration_batches

        batches = []
        for s in sources[1:]:
            train = s.meta.get("train")
            if s.run_dir is None or not isinstance(train, dict) or not isinstance(s.meta.get("data"), dict):
                raise ValueError(f"nexus: the branch {s.origin} is not a moekit training run, so its domain data "
                                 "is unknown")
            batches.append(calibration_batches(s.run_dir, calib_batches, int(train["seq_len"])))
    model, summary, keep, cfg = compose_model(method, sources, btx_cfg=btx_cfg, prompts_cfg=prompts_cfg,
                                              prompts=prompts, nexus_cfg=nexus_cfg, domain_batches=batches)
    summary.out = str(out)
    record = {"method": method, "source": summary.source, "config": cfg}
    write_model(model, keep, record, out, hf_family=hf_family, force=force)
    return summary
