"""Prices per million tokens, token estimates from text, and the cost of one answer.

Token counts, when a dataset has none, are estimated as ceil(characters / 4) — the usual rule of thumb
for English text with GPT-style tokenizers. The output length of an answer, when unknown, is a fixed
number of tokens the user sets (`output_tokens`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# List prices in dollars per million (input, output) tokens; users override them with a price file.
# GPT-4-1106-preview: OpenAI's list price. Mixtral-8x7B-Instruct: a common hosted price (Together, Anyscale).
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4": (30.0, 60.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-3.5-turbo": (0.5, 1.5),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (0.6, 0.6),
}

CHARS_PER_TOKEN = 4.0  # the token estimate's assumption for English text


@dataclass
class Price:
    """The price of one model, in dollars per million tokens."""

    input: float  # dollars per million input (prompt) tokens
    output: float  # dollars per million output (completion) tokens

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Price.{name}: expected a finite number >= 0 (dollars per M tokens), found {v!r}")


@dataclass
class PriceTable:
    """Prices of the models a table or a server uses."""

    prices: dict[str, Price] = field(default_factory=dict)  # model name -> price per M tokens

    def __post_init__(self) -> None:
        self.prices = {k: v if isinstance(v, Price) else Price(**v) for k, v in self.prices.items()}

    @classmethod
    def default(cls) -> PriceTable:
        """The built-in list prices (see `DEFAULT_PRICES`)."""
        return cls({k: Price(*v) for k, v in DEFAULT_PRICES.items()})

    @classmethod
    def from_dict(cls, d: dict, *, base: PriceTable | None = None) -> PriceTable:
        """Prices from `{model: {input: $, output: $}}`, on top of `base` (the defaults when None)."""
        table = dict((base or cls.default()).prices)
        for model, p in d.items():
            if not isinstance(p, dict) or set(p) != {"input", "output"}:
                raise ValueError(f"price of {model!r}: expected {{input: <$ per M>, output: <$ per M>}}, found {p!r}")
            table[model] = Price(**p)
        return cls(table)

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """Prices from a YAML or JSON file holding `{model: {input: $, output: $}}` (on top of the defaults)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            from moekit.utils.deps import require

            d = require("yaml").safe_load(text) or {}
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of model -> price, found {type(d).__name__}")
        return cls.from_dict(d)

    def get(self, model: str) -> Price:
        """The price of `model`; raises naming the priced models when it has none."""
        if model not in self.prices:
            raise KeyError(
                f"no price for model {model!r}; priced: {sorted(self.prices)}. "
                "Add it to a price file ({model: {input: $ per M, output: $ per M}}) and pass --prices"
            )
        return self.prices[model]

    def cost(self, model: str, input_tokens: float, output_tokens: float) -> float:
        """Dollars for one answer of `model` with these token counts."""
        p = self.get(model)
        return (input_tokens * p.input + output_tokens * p.output) / 1e6


def estimate_tokens(text: str) -> int:
    """Estimated token count of `text`: ceil(characters / 4), at least 1."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))
