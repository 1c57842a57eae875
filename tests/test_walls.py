"""Walls of the house that a test guards (docs/architecture.md): every module says what it exports."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmsurgery"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def _public_definitions(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in names if not n.startswith("_")]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_every_module_with_public_names_declares_all(path: Path) -> None:
    tree = ast.parse(path.read_text())
    if not _public_definitions(tree):
        return  # a package marker or a docstring-only index: nothing to export
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{module} defines public names but no __all__"
    missing = [name for name in exported if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"
    assert len(set(exported)) == len(exported), f"{module}.__all__ lists a name twice"
