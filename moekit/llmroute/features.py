"""Difficulty features of a prompt that do not name its topic, so that they can transfer to unseen subjects.

TF-IDF and sentence embeddings say what a question is about; routers trained on them learn which topics
the weak model fails on, and that does not carry over to topics never seen (moekit issue 22). These
features describe how a prompt is built instead, after the query-complexity cues used by difficulty-aware
routers (e.g. Ding et al. 2024, "Hybrid LLM": query difficulty decides the cheap/strong split): length and
structure (characters, words, sentences, numbers, formula symbols, code markers, the multiple-choice
options' lengths) and math / code / multi-step cue words. Optionally a small local LM's mean per-token loss
on the prompt (a moekit training run given by path), a perplexity-style "how unusual is this text" signal.

`difficulty_features(texts) -> [N, F]` gives the raw values (names in `FEATURE_NAMES`); `DifficultyScaler`
standardises them with statistics of the training prompts; `DifficultyEmbedder` (in `embed.py`) appends
them to a topic embedder's vectors so every router that takes features sees both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

_SENTENCE = re.compile(r"[.!?](?:\s|$)")
_NUMBER = re.compile(r"(?<![A-Za-z])[-+]?\d+(?:[.,]\d+)?")
_FORMULA = re.compile(r"[=+\-*/^<>≤≥√∫∑∏πθ±×÷|]|\\[a-z]+|\b[a-z]\s*\(\s*[a-z]\s*\)")
_CODE = re.compile(r"```|\bdef |\breturn\b|\bprint\(|#include|\bint |\bvoid |;\s*$|[{}]|\w+\(\)|==|!=|\+\+", re.M)
_MATH_CUES = re.compile(
    r"\b(?:calculate|compute|solve|evaluate|simplify|how many|how much|probability|equation|integral|derivative|"
    r"sum|product|value of|expected|estimate|percent|ratio|mean|variance|matrix|prove|determine)\b",
    re.I,
)
_CODE_CUES = re.compile(r"\b(?:program|function|code|algorithm|output|variable|loop|array|compile|execute)\b", re.I)
_STEP_CUES = re.compile(
    r"\b(?:first|then|next|after|before|finally|step|steps|if|assume|suppose|given that|which of the following|"
    r"statement\s+[12]|i+\.)\b",
    re.I,
)
_OPTION = re.compile(r"^\s*\(?([A-J])[.)]\s+(.*)$", re.M)

FEATURE_NAMES = (
    "log_chars",  # log(1 + characters of the whole prompt)
    "log_words",  # log(1 + whitespace-separated words)
    "log_sentences",  # log(1 + sentence ends in the stem: . ! ? followed by a space or the end)
    "log_numbers",  # log(1 + numbers written with digits)
    "digit_share",  # digits / characters
    "log_formula",  # log(1 + formula symbols: = + - * / ^ < > and TeX commands, f(x)-style calls)
    "log_code",  # log(1 + code markers: ``` def return print( #include ; at line end, braces, f())
    "log_math_cues",  # log(1 + math cue words: calculate, solve, probability, ...)
    "log_code_cues",  # log(1 + code cue words: program, function, algorithm, ...)
    "log_step_cues",  # log(1 + multi-step cue words: first, then, suppose, which of the following, ...)
    "log_stem_chars",  # log(1 + characters before the first lettered option; the whole prompt when none)
    "n_options",  # lettered options (lines "A. ...", "B) ...", "(C) ...")
    "log_option_mean",  # log(1 + mean characters of an option); 0 without options
    "log_option_max",  # log(1 + characters of the longest option); 0 without options
    "option_cv",  # standard deviation / mean of the option lengths; 0 without options
)


def _log1p(n: float) -> float:
    return float(np.log1p(n))


def prompt_features(text: str) -> np.ndarray:
    """[F] the raw features of one prompt, in the order of `FEATURE_NAMES`."""
    if not isinstance(text, str):
        raise ValueError(f"prompt_features: expected a str prompt, found {type(text).__name__}")
    return np.asarray(_features(text), dtype=np.float64)


@lru_cache(maxsize=1 << 16)  # cross-validation featurises the same prompts once per fold
def _features(text: str) -> tuple[float, ...]:
    chars = len(text)
    options = [m.group(2).strip() for m in _OPTION.finditer(text)]
    first = _OPTION.search(text)
    stem = text[: first.start()] if first else text
    lengths = np.asarray([len(o) for o in options], float)
    has = len(options) > 0
    mean = float(lengths.mean()) if has else 0.0
    return tuple(
        [
            _log1p(chars),
            _log1p(len(text.split())),
            _log1p(len(_SENTENCE.findall(stem))),
            _log1p(len(_NUMBER.findall(text))),
            sum(c.isdigit() for c in text) / max(chars, 1),
            _log1p(len(_FORMULA.findall(text))),
            _log1p(len(_CODE.findall(text))),
            _log1p(len(_MATH_CUES.findall(text))),
            _log1p(len(_CODE_CUES.findall(text))),
            _log1p(len(_STEP_CUES.findall(text))),
            _log1p(len(stem)),
            float(len(options)),
            _log1p(mean),
            _log1p(float(lengths.max())) if has else 0.0,
            float(lengths.std() / mean) if has and mean > 0 else 0.0,
        ]
    )


def difficulty_features(texts: list[str]) -> np.ndarray:
    """[N, F] raw difficulty features of `texts` (F = len(FEATURE_NAMES))."""
    if len(texts) == 0:
        return np.zeros((0, len(FEATURE_NAMES)))
    return np.stack([prompt_features(t) for t in texts])


@dataclass
class DifficultyScaler:
    """Standardises features with the mean and standard deviation of the training prompts."""

    mean: np.ndarray  # [F] training mean of each feature
    std: np.ndarray  # [F] training standard deviation (1 where a feature is constant)

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float64)
        self.std = np.asarray(self.std, np.float64)
        if self.mean.ndim != 1 or self.mean.shape != self.std.shape:
            raise ValueError(
                f"DifficultyScaler: expected mean and std of one shape [F], found {self.mean.shape}, {self.std.shape}"
            )
        if np.any(self.std <= 0):
            raise ValueError("DifficultyScaler.std: expected standard deviations > 0")

    @classmethod
    def fit(cls, feats: np.ndarray) -> DifficultyScaler:
        """Statistics of `feats: [N, F]` (N >= 1)."""
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2 or len(feats) == 0:
            raise ValueError(f"DifficultyScaler.fit: expected features [N>0, F], found shape {list(feats.shape)}")
        std = feats.std(axis=0)
        return cls(feats.mean(axis=0), np.where(std > 1e-12, std, 1.0))

    def transform(self, feats: np.ndarray) -> np.ndarray:
        """[N, F] (feats - mean) / std, clipped to [-5, 5] so one odd prompt cannot dominate a distance."""
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2 or feats.shape[1] != len(self.mean):
            raise ValueError(
                f"DifficultyScaler.transform: expected features [N, {len(self.mean)}], found {list(feats.shape)}"
            )
        return np.clip((feats - self.mean) / self.std, -5.0, 5.0)


def lm_token_loss(texts: list[str], run: str | Path, *, max_tokens: int | None = None, batch: int = 16) -> np.ndarray:
    """[N] mean next-token cross-entropy (nats per token) of a moekit LM on each text (perplexity = exp).

    `run`: a moekit training run folder (its checkpoint and `tokenizer.json`). Texts are cut to the model's
    `max_seq_len` (or `max_tokens`); a text of fewer than 2 tokens gets loss 0. Runs on CPU in float32.
    """
    import torch
    import torch.nn.functional as F

    from moekit.data.tokenizer import BPETokenizer
    from moekit.train.checkpoint import load_model

    run = Path(run)
    tok_path = run / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"lm_token_loss: expected a moekit run with {tok_path}, found none")
    model = load_model(run).eval()
    limit = min(max_tokens or model.config.max_seq_len, model.config.max_seq_len)
    ids = [i[:limit] for i in BPETokenizer.load(tok_path).encode_batch(list(texts))]
    out = np.zeros(len(texts))
    order = np.argsort([len(i) for i in ids])  # similar lengths together: less padding
    with torch.no_grad():
        for s in range(0, len(order), batch):
            rows = [int(r) for r in order[s : s + batch] if len(ids[r]) >= 2]
            if not rows:
                continue
            width = max(len(ids[r]) for r in rows)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width - 1)
            for j, r in enumerate(rows):
                x[j, : len(ids[r])] = torch.tensor(ids[r])
                mask[j, : len(ids[r]) - 1] = 1.0
            logits = model(x).logits.float()  # [B, L, V]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # [B, L-1]
            loss = (nll * mask).sum(1) / mask.sum(1)
            out[rows] = loss.numpy()
    return out
