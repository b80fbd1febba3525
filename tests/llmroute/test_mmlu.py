"""The real MMLU routing table (skipped when ../shared/data/routellm-mmlu is absent; slow)."""

from __future__ import annotations

import pytest

from moekit.llmroute.embed import TfidfConfig, TfidfEmbedder
from moekit.llmroute.evaluate import evaluate
from moekit.llmroute.loaders import load_routellm
from moekit.llmroute.routers import create
from moekit.llmroute.table import SplitConfig, split_rows


@pytest.mark.slow
def test_threshold_router_beats_random_on_mmlu(mmlu_path):
    table = load_routellm(mmlu_path)
    parts = split_rows(table, SplitConfig(by="query", test_size=0.2, seed=0))
    train, test = table.subset(parts.train), table.subset(parts.test)
    emb = TfidfEmbedder(TfidfConfig(dim=128)).fit(train.queries)
    router = create("threshold").fit(train, emb.encode(train.queries))
    ev = evaluate(router, emb.encode(test.queries), test)
    rand = evaluate(
        create("random").fit(train, emb.encode(train.queries[:1]).repeat(len(train), 0)), emb.encode(test.queries), test
    )
    assert rand.apgr == pytest.approx(0.5, abs=0.05)
    assert ev.apgr > 0.6 and ev.cpt50 < 0.35  # recorded: APGR 0.66, CPT(50%) 0.27 at 256 dimensions


def test_mmlu_files_give_exactly_the_two_models(mmlu_path):
    table = load_routellm(mmlu_path)
    assert table.models == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"] and len(table) == 14042
    assert table.quality.mean(axis=0) == pytest.approx([0.681, 0.806], abs=1e-3)  # as the data's README says
