"""Walls of the house that a test guards (docs/architecture.md): every module says what it exports."""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmsurgery"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


@functools.cache
def _tree(path: Path) -> ast.Module:
    """A module's syntax tree, parsed once per run (each wall walks every module)."""
    return ast.parse(path.read_text())


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
    tree = _tree(path)
    if not _public_definitions(tree):
        return  # a package marker or a docstring-only index: nothing to export
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    mod = importlib.import_module(module)
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{module} defines public names but no __all__"
    missing = [name for name in exported if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"
    assert len(set(exported)) == len(exported), f"{module}.__all__ lists a name twice"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Module → the mmsurgery modules it imports anywhere (top level or inside a function)."""
    modules = {_module_name(p) for p in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        name = _module_name(path)
        edges: set[str] = set()
        for node in ast.walk(_tree(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "mmsurgery" and not name.startswith(t + "."):
                    edges.add(t)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_among_the_modules() -> None:
    """Imports run one way (docs/architecture.md), counting imports inside functions: a circle means a shared
    piece lacks its own module (`verify/archs.py` removed the arch ↔ hf_arch one, `checkpoint/loaded.py` the
    reader ↔ dcp one)."""
    assert _cycles(_imports()) == []


def test_the_cycle_finder_sees_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """Every string constant of a module's code (f-string pieces included), docstrings left out."""
    tree = _tree(path)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def _family_key_names() -> set[str]:
    """Literal key names the family table and the timm ViT's layout match: every role pattern without a group,
    split at its alternatives (`attn.qkv.weight`, `attention.self.query.weight`, ...), and the timm ViT's
    block linears and embeddings."""
    from mmsurgery.layout.families import FAMILIES
    from mmsurgery.layout.timm_vit import BLOCK_LINEARS, NO_WEIGHT_DECAY

    names = {
        alt.replace("\\.", ".") for f in FAMILIES for p in f.roles.values() if "(" not in p for alt in p.split("|")
    }
    return names | {f"{n}.weight" for n in BLOCK_LINEARS} | {"patch_embed.proj", *NO_WEIGHT_DECAY}


def _key_name_hits(path: Path, names: set[str]) -> list[str]:
    return [
        f"{path.name}:{line} {value[:60]!r}" for line, value in _code_strings(path) if any(n in value for n in names)
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_only_layout_matches_family_key_names(path: Path) -> None:
    """Only `layout/` knows how a family names its tensors (docs/architecture.md, Walls); `hf.py` applies
    transformers' own renaming rules, which name no family. A new family is one table entry, never a string in
    another module."""
    if path.relative_to(PACKAGE).parts[0] == "layout":
        return
    assert _key_name_hits(path, _family_key_names()) == []


def test_the_key_name_wall_sees_a_key_name(tmp_path: Path) -> None:
    leak = tmp_path / "leak.py"
    leak.write_text('"""A docstring may say blocks.0.attn.qkv.weight."""\nKEY = "blocks.0.attn.qkv.weight"\n')
    assert _key_name_hits(leak, _family_key_names()) == ["leak.py:2 'blocks.0.attn.qkv.weight'"]


def _contract_names() -> set[str]:
    """What only the paired-file contract may spell out: the pathway tensor suffixes and every metadata key."""
    import mmsurgery.paired_format as contract

    keys = {getattr(contract, n) for n in contract.__all__ if n.endswith("_KEY")}
    return keys | {contract.AUX_SUFFIX, contract.SCALE_SUFFIX}


def _contract_hits(path: Path, names: set[str]) -> list[str]:
    """String constants that are a contract name (a metadata key, `aux_weight`, `cross_modal_scale`) or one of its
    numbered forms (`mmsurgery.plan.1`, `aux_weight_1`): a module spelling the contract out itself. Names inside a
    sentence (an error message) are not keys."""
    numbered = re.compile(r"(?:[._][1-9][0-9]*)?")
    return [
        f"{path.name}:{line} {value!r}"
        for line, value in _code_strings(path)
        if any(value.startswith(n) and numbered.fullmatch(value[len(n) :]) for n in names)
    ]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_only_the_contract_names_pathway_keys_and_metadata_keys(path: Path) -> None:
    if path.name == "paired_format.py" and path.parent == PACKAGE:
        return
    assert _contract_hits(path, _contract_names()) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_only_the_contract_defines_the_rules_of_lambda(path: Path) -> None:
    """λ's shape rules (`scale_shape`, `scale_problem`, `block_view`) and the `P.weight` <-> `P` rule
    (`weight_key`, `module_of`) are defined once, in the contract."""
    if path.name == "paired_format.py" and path.parent == PACKAGE:
        return
    rules = {"scale_shape", "scale_problem", "block_view", "weight_key", "module_of"}
    tree = _tree(path)
    defined = [
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name in rules
    ]
    assert defined == []


def test_the_contract_wall_sees_a_metadata_key(tmp_path: Path) -> None:
    leak = tmp_path / "leak.py"
    leak.write_text('meta = {"mmsurgery.scales": "1", "mmsurgery.plan.2": "{}"}\nnote = "no mmsurgery.vit here"\n')
    assert _contract_hits(leak, _contract_names()) == ["leak.py:1 'mmsurgery.scales'", "leak.py:1 'mmsurgery.plan.2'"]
