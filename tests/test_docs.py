"""The Python snippets in the README and docs run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/routing.md", "docs/training.md", "docs/analysis.md", "docs/surgery.md",
         "docs/compress.md", "docs/adapt.md", "docs/convert.md", "docs/infer.md"]


def snippets(page: str) -> list[tuple[str, str]]:
    text = (ROOT / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [(f"{page}#{i}", b) for i, b in enumerate(blocks)]


CASES = [c for page in PAGES for c in snippets(page)]


@pytest.mark.parametrize("name,code", CASES, ids=[c[0] for c in CASES])
def test_snippet_runs(name, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})


def test_pages_have_snippets():
    assert len(CASES) >= 5
