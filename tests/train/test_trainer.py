"""Training loop: loss goes down, checkpoints round-trip, resume is exact, Ctrl-C saves, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.train import TrainConfig, evaluate, load_model, read_meta, train
from moekit.train.schedule import lr_at
from tests.helpers import tiny_lm


class Synthetic:
    """Two 'domains' of token patterns: a counting sequence and a repeated pair."""

    labels = ["count", "pairs"]

    def __init__(self, vocab: int = 32) -> None:
        self.vocab = vocab

    def _seq(self, label: int, n: int, g: torch.Generator) -> torch.Tensor:
        start = int(torch.randint(0, self.vocab, (1,), generator=g))
        if label == 0:
            return (torch.arange(n) + start) % self.vocab
        a, b = start, (start * 7 + 3) % self.vocab
        return torch.tensor([a, b] * (n // 2 + 1))[:n]

    def sample_batch(self, batch_size, seq_len, generator):
        labels = torch.randint(0, 2, (batch_size,), generator=generator)
        seqs = torch.stack([self._seq(int(l), seq_len + 1, generator) for l in labels])
        return seqs[:, :-1], seqs[:, 1:], labels

    def windows(self, seq_len, n=4):
        g = torch.Generator().manual_seed(123)
        out = {}
        for i, name in enumerate(self.labels):
            seqs = torch.stack([self._seq(i, seq_len + 1, g) for _ in range(n)])
            out[name] = (seqs[:, :-1], seqs[:, 1:])
        return out


MODEL = tiny_lm(vocab_size=32, max_seq_len=16, ffn_hidden=32, num_experts=4, expert_hidden=16, router_args={"k": 2})
TRAIN = dict(batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, eval_every=5, ckpt_every=5, log_every=1)


def run(tmp, steps, *, model=MODEL, resume=False, overwrite=False, files=None, on_step=None, stop_after=None, **kw):
    data = Synthetic()
    return train(
        model,
        TrainConfig(steps=steps, **{**TRAIN, **kw}),
        data,
        data.windows(16),
        tmp,
        resume=resume,
        overwrite=overwrite,
        files=files,
        progress=False,
        on_step=on_step,
        stop_after=stop_after,
    )


def weights(run_dir):
    return load_model(run_dir).state_dict()


def test_loss_decreases_and_logs_are_written(tmp_path):
    res = run(tmp_path / "r", 30)
    assert res.step == 30 and not res.interrupted
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.5
    assert set(res.final_eval.loss_per_label) == {"count", "pairs"}
    lines = (tmp_path / "r" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 30
    assert read_meta(tmp_path / "r")["step"] == 30


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    res = run(tmp_path / "r", 5)
    model = load_model(res.run_dir).eval()
    again = load_model(res.run_dir).eval()
    ids = torch.randint(0, 32, (2, 10))
    assert torch.equal(model(ids).logits, again(ids).logits)
    # and equals the evaluation recorded during training
    data = Synthetic()
    torch.testing.assert_close(evaluate(model, data.windows(16)).loss, res.final_eval.loss)


@pytest.mark.parametrize(
    "router",
    [
        {"router": "topk"},
        {"router": "deepseek", "router_args": {"k": 2, "bias_update_rate": 0.01}},
        {"router": "topk", "router_args": {"k": 2, "selection_bias": True, "bias_update_rate": 0.01}},
        {"router": "topk", "router_args": {"k": 2, "noise": "jitter"}},
    ],
)
def test_resume_is_exact(tmp_path, router):
    model = MODEL.replace(**router)
    run(tmp_path / "full", 20, model=model)
    first = run(tmp_path / "split", 20, model=model, stop_after=10)
    assert first.step == 10 and read_meta(tmp_path / "split")["step"] == 10
    run(tmp_path / "split", 20, model=model, resume=True)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_and_resume_replays_exactly(tmp_path):
    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    res = run(tmp_path / "split", 12, on_step=interrupt)
    assert res.interrupted and res.step == 7 and read_meta(tmp_path / "split")["step"] == 7
    run(tmp_path / "split", 12, resume=True)
    run(tmp_path / "full", 12)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_is_not_overwritten_and_resume_checks_config(tmp_path):
    run(tmp_path / "r", 5)
    before = (tmp_path / "r" / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="resume"):
        run(tmp_path / "r", 5)
    with pytest.raises(ValueError, match="(?s)model config differs.*dim"):
        run(tmp_path / "r", 10, model=MODEL.replace(dim=64), resume=True)
    with pytest.raises(ValueError, match="(?s)train config differs.*lr"):
        run(tmp_path / "r", 10, resume=True, lr=1.0)
    assert (tmp_path / "r" / "checkpoint" / "model.safetensors").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run(tmp_path / "empty", 5, resume=True)


def test_checkpoint_from_a_different_config_fails_clearly(tmp_path):
    import json

    run(tmp_path / "r", 5)
    cfg_path = tmp_path / "r" / "checkpoint" / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["model"]["expert_hidden"] = 24
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="(?s)does not match its config.*wrong shapes"):
        load_model(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="no moekit checkpoint"):
        load_model(tmp_path)


def test_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup=4, total=14, min_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.55)
    assert lr_at(14, **kw) == pytest.approx(0.1)


def test_bad_train_config():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"stepz": 3})


def test_thor_consistency_two_passes(tmp_path):
    """consistency > 0: mean CE of two passes + alpha x symmetric KL. A deterministic router makes the passes
    identical (KL 0 with zero gradient), so training equals the one-pass run; random routing gives KL > 0."""
    run(tmp_path / "one", 3)
    run(tmp_path / "two", 3, consistency=2.0)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "two" / "train.jsonl").read_text().splitlines()]
    assert all(r["consistency"] == 0.0 for r in rows)  # bit-identical passes
    thor = MODEL.replace(router="stochastic", router_args={"k": 1})
    run(tmp_path / "thor", 3, model=thor, consistency=1.0)
    rows = [json.loads(line) for line in (tmp_path / "thor" / "train.jsonl").read_text().splitlines()]
    assert all(r["consistency"] > 1e-7 for r in rows)  # small at init: the experts start out alike
    with pytest.raises(ValueError, match="consistency"):
        TrainConfig(consistency=-1.0)


def test_micro_batch_loss_matches_thor_objective():
    from moekit.models import MoELM
    from moekit.routing.stochastic import thor_objective
    from moekit.train.trainer import micro_batch_loss

    model = MoELM(MODEL.replace(router="stochastic", router_args={"k": 1})).train()
    x = torch.randint(0, 32, (2, 8))
    torch.manual_seed(7)
    ce, aux, cons, _ = micro_batch_loss(model, x, x, 1.5)
    torch.manual_seed(7)
    want, parts = thor_objective(lambda: model(x).logits, x, alpha=1.5)
    torch.testing.assert_close(ce + 1.5 * cons, want)
    torch.testing.assert_close(cons, parts["consistency"])
    assert float(aux) == 0.0  # THOR's router has no auxiliary loss
