"""Difficulty features by hand, the difficulty embedder, and a moekit LM's per-token loss on prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moekit.llmroute.embed import DifficultyEmbedder, load_embedder, make_embedder
from moekit.llmroute.features import FEATURE_NAMES, DifficultyScaler, difficulty_features, prompt_features

MATH = "Compute 2 + 3 = ?\nA. 5\nB. 16\nAnswer:"
CODE = "def f():\n    return x\nWhat does the program print?"
PLAIN = "Who wrote Hamlet. It was a play."


def feats(text: str) -> dict[str, float]:
    return dict(zip(FEATURE_NAMES, prompt_features(text).tolist(), strict=True))


def test_math_prompt_by_hand():
    f = feats(MATH)
    lg = math.log1p
    assert f["log_chars"] == pytest.approx(lg(36))
    assert f["log_words"] == pytest.approx(lg(11))  # Compute 2 + 3 = ? A. 5 B. 16 Answer:
    assert f["log_sentences"] == pytest.approx(lg(1))  # the stem's "?"; option letters "A." do not count
    assert f["log_numbers"] == pytest.approx(lg(4))  # 2 3 5 16
    assert f["digit_share"] == pytest.approx(5 / 36)
    assert f["log_formula"] == pytest.approx(lg(2))  # + =
    assert f["log_code"] == 0.0 and f["log_code_cues"] == 0.0
    assert f["log_math_cues"] == pytest.approx(lg(1))  # compute
    assert f["log_stem_chars"] == pytest.approx(lg(18))  # "Compute 2 + 3 = ?\n"
    assert f["n_options"] == 2.0
    assert f["log_option_mean"] == pytest.approx(lg(1.5))  # "5", "16"
    assert f["log_option_max"] == pytest.approx(lg(2))
    assert f["option_cv"] == pytest.approx(0.5 / 1.5)


def test_code_and_plain_prompts_by_hand():
    c, p = feats(CODE), feats(PLAIN)
    assert c["log_code"] == pytest.approx(math.log1p(3))  # "def ", "return", "f()"
    assert c["log_code_cues"] == pytest.approx(math.log1p(1))  # program
    assert c["n_options"] == 0.0 and c["log_option_mean"] == 0.0 and c["option_cv"] == 0.0
    assert c["log_stem_chars"] == c["log_chars"]  # no options: the stem is the whole prompt
    assert p["log_sentences"] == pytest.approx(math.log1p(2))
    assert p["log_numbers"] == 0.0 and p["log_formula"] == 0.0 and p["log_math_cues"] == 0.0
    assert feats("First solve x, then suppose y.")["log_step_cues"] == pytest.approx(math.log1p(3))


def test_features_shape_and_bad_input():
    assert difficulty_features([MATH, CODE, PLAIN]).shape == (3, len(FEATURE_NAMES))
    assert difficulty_features([]).shape == (0, len(FEATURE_NAMES))
    with pytest.raises(ValueError, match="str"):
        prompt_features(3)  # type: ignore[arg-type]


def test_scaler_standardises_and_keeps_constant_features_finite():
    f = difficulty_features([MATH, CODE, PLAIN, MATH + " more words here"])
    s = DifficultyScaler.fit(f)
    z = s.transform(f)
    assert np.all(np.isfinite(z))
    varying = f.std(0) > 1e-12
    assert np.allclose(z[:, varying].mean(0), 0, atol=1e-9) and np.allclose(z[:, varying].std(0), 1)
    assert np.all(z[:, ~varying] == 0)
    with pytest.raises(ValueError, match=r"\[N, 15\]"):
        s.transform(np.zeros((2, 3)))


def test_difficulty_embedder_appends_features_and_round_trips(tmp_path):
    texts = [MATH, CODE, PLAIN, "What is the capital of France?", "Solve 3x = 9 for x.", "Explain the Treaty."]
    emb = make_embedder("tfidf", difficulty=True, dim=3, min_df=1).fit(texts)
    assert isinstance(emb, DifficultyEmbedder)
    x = emb.encode(texts)
    assert x.shape == (6, 3 + len(FEATURE_NAMES))
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    topic = make_embedder("tfidf", difficulty={"weight": 0.0}, dim=3, min_df=1).fit(texts).encode(texts)
    assert np.allclose(topic[:, 3:], 0.0) and np.allclose(topic[:, :3], emb.base.encode(texts))
    emb.save(tmp_path / "e")
    back = load_embedder(tmp_path / "e")
    assert isinstance(back, DifficultyEmbedder) and back.fingerprint() == emb.fingerprint()
    assert np.allclose(back.encode(texts), x)
    with pytest.raises(ValueError, match="weight"):
        make_embedder("tfidf", difficulty={"weight": -1.0})


def test_lm_token_loss_matches_one_prompt_at_a_time(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    import torch.nn.functional as F

    from moekit.data.tokenizer import BPETokenizer, TokenizerConfig
    from moekit.llmroute.features import lm_token_loss
    from moekit.models import MoELM
    from moekit.train import save_checkpoint
    from tests.helpers import tiny_lm

    texts = [MATH, CODE, PLAIN, "x", "Solve 3x = 9 for x."]
    tok = BPETokenizer.train(texts * 3, TokenizerConfig(vocab_size=280, min_frequency=1))
    tok.save(tmp_path / "run" / "tokenizer.json")
    torch.manual_seed(0)
    model = MoELM(tiny_lm(vocab_size=tok.vocab_size, num_experts=4, expert_hidden=16, router_args={"k": 2}))
    save_checkpoint(tmp_path / "run", model, {})
    got = lm_token_loss(texts, tmp_path / "run", batch=3)
    model.eval()
    for text, loss in zip(texts, got, strict=True):
        ids = torch.tensor(tok.encode(text)[:32])[None]
        if ids.shape[1] < 2:
            assert loss == 0.0
            continue
        with torch.no_grad():
            ref = F.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:])
        assert loss == pytest.approx(float(ref), rel=1e-4)
    assert got.max() > 0
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        lm_token_loss(texts, tmp_path)
