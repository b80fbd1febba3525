"""A byte-level BPE tokenizer trained with Hugging Face `tokenizers`: exact round trip for any text.

Bytes, not characters, are the alphabet (all 256 are in the vocabulary), there is no normaliser and no unknown
token, so `decode(encode(text)) == text` for every string: unicode, tabs, `\\r\\n`, runs of spaces in code.
Special tokens (`<|endoftext|>`) are never produced from text: a document that contains the string
"<|endoftext|>" is tokenised as ordinary bytes; the special ids are inserted only by code, as separators.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moekit.data.cache import write_text_atomic
from moekit.utils.deps import require

EOS_TOKEN = "<|endoftext|>"
_BYTE_ALPHABET = 256


@dataclass(frozen=True)
class TokenizerConfig:
    """How a byte-level BPE tokenizer is trained."""

    vocab_size: int = 8192  # total ids, including the 256 byte tokens and the special tokens
    min_frequency: int = 2  # a pair is merged only if it occurs at least this often in the training text
    special_tokens: tuple[str, ...] = (EOS_TOKEN,)  # ids 0.. in this order; the first is the end-of-text separator

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        smallest = _BYTE_ALPHABET + len(self.special_tokens)
        if not isinstance(self.vocab_size, int) or self.vocab_size < smallest:
            raise ValueError(
                f"TokenizerConfig.vocab_size must be an int >= {smallest} (256 bytes + "
                f"{len(self.special_tokens)} special tokens), found {self.vocab_size!r}"
            )
        if self.min_frequency < 1:
            raise ValueError(f"TokenizerConfig.min_frequency must be >= 1, found {self.min_frequency}")
        if not self.special_tokens or len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(
                f"TokenizerConfig.special_tokens must be non-empty and distinct, found {self.special_tokens}"
            )


class BPETokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer`: train, save/load JSON, encode/decode, the EOS id."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        # Special tokens in text are plain text; separators are added by id, never parsed from documents.
        self._tok.encode_special_tokens = True
        special = [
            t
            for t, _ in sorted(
                ((tok.content, i) for i, tok in tokenizer.get_added_tokens_decoder().items()), key=lambda p: p[1]
            )
        ]
        if EOS_TOKEN not in special:
            raise ValueError(f"tokenizer has no {EOS_TOKEN!r} special token; its special tokens are {special}")
        self.eos_token = EOS_TOKEN
        self.eos_id: int = tokenizer.token_to_id(EOS_TOKEN)
        self.special_tokens: list[str] = special

    # ---- construction ----
    @classmethod
    def train(
        cls, texts: Iterable[str], config: TokenizerConfig | None = None, length: int | None = None
    ) -> BPETokenizer:
        """Train on `texts` (an iterable of documents; `length` only feeds progress reporting)."""
        config = config or TokenizerConfig()
        tk = require("tokenizers")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(config.special_tokens),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=length)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected a tokenizer JSON file at {path}, found nothing")
        tokenizers = require("tokenizers")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{path}: not a readable tokenizer JSON file: {e}") from e
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON (the `tokenizers` format, loadable by transformers), atomically."""
        write_text_atomic(path, self._tok.to_str(pretty=True))

    # ---- use ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def tokenizer_config_dict(config: TokenizerConfig) -> dict:
    """JSON-ready form of a `TokenizerConfig` (for cache keys and metadata)."""
    d = asdict(config)
    d["special_tokens"] = list(config.special_tokens)
    return d
