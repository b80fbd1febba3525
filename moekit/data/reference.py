"""The reference data: every built-in domain, unbalanced, about 24 M tokens with a 2,048-token BPE vocabulary.

Large enough that a reference model trained for tens of millions of tokens does not see the same text many
times (the default `DataConfig()` is ~1.6 M tokens). What each domain contributes is in docs/data.md.
"""

from __future__ import annotations

from moekit.data.corpus import ALL_DOMAINS
from moekit.data.prepare import DataConfig

# The cap binds only `libcode` (117 M characters available) and `docs` (32 M); wiki, bible and code stay whole.
REFERENCE_MAX_CHARS_PER_DOMAIN = 28_000_000
REFERENCE_VOCAB_SIZE = 2048


def reference_data_config(seed: int = 0) -> DataConfig:
    """The named reference data config: all five domains, `balance=False`, 28 M characters at most per domain.

    Measured (seed 0, CPython 3.11.7, the packages of moekit's extras): >= 20 M training tokens; see docs/data.md.
    `seed` changes which libcode/docs documents are drawn and the split, nothing else.
    """
    return DataConfig(
        spec="builtin",
        vocab_size=REFERENCE_VOCAB_SIZE,
        seed=seed,
        max_chars_per_domain=REFERENCE_MAX_CHARS_PER_DOMAIN,
        domains=list(ALL_DOMAINS),
        balance=False,
    )
