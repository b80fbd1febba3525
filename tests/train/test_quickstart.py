"""The quickstart end to end on micro presets: both runs, the report, the figures, rerun reuse."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moekit.train.quickstart import QuickstartConfig, quickstart


def test_quickstart_micro(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    cfg = QuickstartConfig(
        out=str(tmp_path / "qs"),
        steps=3,
        batch_size=4,
        seq_len=16,
        vocab_size=320,
        max_chars_per_domain=60_000,
        eval_every=3,
        eval_windows=2,
        dense_preset="micro-dense",
        moe_preset="micro-moe",
        sample_tokens=5,
    )
    res = quickstart(cfg, progress=False, log=lambda *_: None)
    assert set(res.evals) == {"dense", "moe"}
    assert set(res.evals["moe"].loss_per_label) == {"bible", "code", "wiki"}
    assert res.evals["moe"].moe_layers == [0, 1] and not res.evals["dense"].moe_layers
    assert abs(res.params["dense"]["active"] - res.params["moe"]["active"]) <= 32 * 4 * 2  # routers only
    text = res.report.read_text()
    assert "| dense |" in text and "| moe |" in text and "specialise" in text and res.sample.startswith("And God said")
    assert all(f.is_file() and f.stat().st_size > 1000 for f in res.figures)
    # rerunning reuses the finished runs (nothing retrained, same numbers)
    again = quickstart(cfg, progress=False, log=lambda *_: None)
    assert again.evals["moe"].loss == res.evals["moe"].loss
    # an interrupted run (Ctrl-C/SIGTERM) stops the quickstart instead of going on to the next model
    import moekit.train.quickstart as qs_mod

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[3])
        return SimpleNamespace(interrupted=True)

    monkeypatch.setattr(qs_mod, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quickstart(cfg, progress=False, log=lambda *_: None)
    assert calls == [tmp_path / "qs" / "dense"]
