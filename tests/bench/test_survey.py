"""The one-batch router survey behind `moekit demo` (moekit.bench.survey)."""

from __future__ import annotations

import pytest

from moekit.bench.survey import survey_routers


def test_survey_summarises_each_router_on_one_batch():
    rows = survey_routers(routers=["topk", "switch", "null_experts"], dim=8, num_experts=4, hidden=8, tokens=64,
                          repeats=1)
    assert [r.router for r in rows] == ["topk", "switch", "null_experts"]
    by = {r.router: r for r in rows}
    assert by["topk"].active_per_token == pytest.approx(2.0) and by["topk"].dropped_pct == 0
    assert by["switch"].active_per_token <= 1.0  # top-1, some slots dropped by capacity
    assert by["null_experts"].active_per_token <= 2.0
    assert all(r.max_over_mean_load >= 1.0 and r.ms > 0 for r in rows)
