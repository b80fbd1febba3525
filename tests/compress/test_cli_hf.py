"""`moekit compress METHOD HF_DIR`: a Hugging Face checkpoint in, a checkpoint transformers loads out (or
nothing at all), calibrated on the built-in corpus with the checkpoint's own tokenizer or on a --calib file."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from moekit.cli.main import app  # noqa: E402
from tests.hf.tiny import tiny_model  # noqa: E402


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_tokenizer():
    """A character-level BPE tokenizer of 90 tokens (the tiny models have 96), trained offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog", "def main(): return 0", "In the beginning God created"]
    tok.train_from_iterator(text * 5, trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture
def hf_dir(tmp_path):
    src = tmp_path / "src"
    tiny_model("qwen3_moe").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    return src


def test_compress_hf_checkpoint_with_its_tokenizer(hf_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit.hf as mh

    dst = tmp_path / "pruned"
    r = invoke("compress", "reap", hf_dir, "--out", dst, "--ratio", "0.25", "--calib-batches", "2",
               "--calib-seq-len", "16")
    assert r.exit_code == 0, r.output
    assert "params MoE" in r.output and "loss all" in r.output and "loss wiki" in r.output
    cfg = AutoConfig.from_pretrained(dst)
    assert cfg.num_experts == 6 and cfg.model_type == "qwen3_moe"
    record = json.loads((dst / "moekit_compress.json").read_text())
    assert record["method"] == "reap" and record["family"] == "qwen3_moe" and len(record["kept"]["0"]) == 6
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    ref = mh.patch(AutoModelForCausalLM.from_pretrained(hf_dir).eval())
    for layer, ids in zip(mh.patched_layers(ref), record["kept"].values(), strict=True):
        from moekit.layers import keep_experts

        keep_experts(layer, ids)
    x = torch.randint(3, 90, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    assert (dst / "tokenizer.json").is_file()


def test_compress_hf_with_calib_ids_and_bad_input(hf_dir, tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps(list(range(3, 90)) * 3))
    dst = tmp_path / "out" / "pruned"
    r = invoke("compress", "frequency", hf_dir, "--out", dst, "--calib", tmp_path / "ids.json", "--calib-batches",
               "2", "--calib-seq-len", "16", "--ratio", "0.5")
    assert r.exit_code == 0, r.output
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(dst).num_experts == 4
    cases = [
        (["--ratio", "1.5"], "ratio"),
        (["--ratio", "0.9"], "k=2"),
        (["--calib", tmp_path / "missing.json"], "no such file"),
    ]
    bad = tmp_path / "bad" / "pruned"
    for extra, msg in cases:
        r = invoke("compress", "reap", hf_dir, "--out", bad, "--calib-seq-len", "16", *extra)
        assert r.exit_code == 1 and msg in r.output, r.output
        assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
        assert not bad.exists() and not (tmp_path / "bad").exists()
    r = invoke("compress", "reap", hf_dir, "--out", dst, "--calib", tmp_path / "ids.json")
    assert r.exit_code == 1 and "--force" in r.output
