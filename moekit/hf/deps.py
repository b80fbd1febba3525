"""The one place that checks the optional `transformers` dependency (CONVENTIONS 9)."""

from __future__ import annotations

from types import ModuleType


def require_transformers() -> ModuleType:
    """Import and return `transformers`, or fail with the install command."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - exercised only without transformers
        raise ImportError(
            "moekit.hf needs Hugging Face transformers >= 5: pip install 'transformers>=5'"
        ) from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:  # pragma: no cover
        raise ImportError(
            f"moekit.hf needs transformers >= 5 (fused experts); found {transformers.__version__}: "
            "pip install -U 'transformers>=5'"
        )
    return transformers
