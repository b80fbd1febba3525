"""`__all__` lists only what a module defines: a module's own classes, functions and constants; a package's
`__init__` only names defined in its own submodules (never re-exports from elsewhere in moekit)."""

from __future__ import annotations

import ast
from pathlib import Path

import moekit

ROOT = Path(moekit.__file__).parent


def _exports(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return None


def _origins(tree: ast.Module, package: str) -> dict[str, str]:
    """name -> where it comes from: "" for defined here, else the module it is imported from."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = ""
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    out[t.id] = ""
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolve against the package
                mod = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([mod] if mod else []))
            for a in node.names:
                out[a.asname or a.name] = mod
    return out


def test_all_lists_only_what_the_module_or_package_defines():
    bad = []
    checked = 0
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = _exports(tree)
        if names is None:
            continue
        checked += 1
        rel = path.relative_to(ROOT.parent).with_suffix("")
        is_pkg = path.name == "__init__.py"
        module = ".".join(rel.parts[:-1] if is_pkg else rel.parts)
        origins = _origins(tree, module)
        for name in names:
            origin = origins.get(name)
            ok = origin == "" or (is_pkg and origin is not None and origin.startswith(module + "."))
            if not ok:
                bad.append(f"{module}.__all__ names {name!r} ({'from ' + origin if origin else 'not defined'})")
    assert checked >= 10
    assert not bad, "\n".join(bad)


def test_router_base_class_is_exported():
    from moekit.routing import Router
    from moekit.routing.base import Router as Base

    assert Router is Base
