"""`moekit generate --expert-memory / --disable-experts / --force-expert`."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.data import BPETokenizer
from moekit.infer.steer import steer


def _gen(run, *extra):
    args = ["generate", str(run), "--prompt", "In the", "--max-new-tokens", "6", "--temperature", "0", *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


def test_generate_offloaded_matches_resident(tiny_run):
    run, _ = tiny_run
    plain = _gen(run)
    assert plain.exit_code == 0, plain.output
    off = _gen(run, "--expert-memory", "30%", "--policy", "lfu", "--prefetch", "--stats")
    assert off.exit_code == 0, off.output
    text, stats = off.output.rsplit("expert cache:", 1)
    assert text == plain.output
    assert "hit rate" in stats and "misses" in stats


def test_generate_steered_and_errors(tiny_run):
    run, model = tiny_run
    tok = BPETokenizer.load(run / "tokenizer.json")
    prompt = torch.tensor([tok.encode("In the")])
    disable, force = {0: [0, 1, 2, 3, 4, 5]}, {1: [3]}
    with steer(model, disable=disable, force=force):
        want = model.generate(prompt, 6, eos_id=tok.eos_id)
    assert not torch.equal(want, model.generate(prompt, 6, eos_id=tok.eos_id))  # steering changes the tokens
    steered = _gen(run, "--disable-experts", "0:0,0:1,0:2,0:3,0:4,0:5", "--force-expert", "1:3")
    assert steered.exit_code == 0, steered.output
    assert steered.output == tok.decode(want[0].tolist(), skip_special_tokens=True) + "\n"
    small = _gen(run, "--expert-memory", "100B")
    assert small.exit_code == 1 and "k=2 active experts" in small.output
    assert len(small.output.strip().splitlines()) == 1
    bad = _gen(run, "--disable-experts", "0:0,0:1,0:2,0:3,0:4,0:5,0:6")
    assert bad.exit_code == 1 and "leaves fewer" in bad.output
