"""The package's layers, checked by walking every import statement in `shardconv/`.

errors/frontend/progress < util < formats < core < sources < mapping < sinks <
front ends (api, cli, verify, testing). A module imports only its own layer or
lower ones (`if TYPE_CHECKING:` imports excepted: they name a contract for the
type checker and run nothing), no two modules import each other even through
others, and no module imports a private (`_name`) name from another package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shardconv"

LAYERS = {
    "errors": 0, "frontend": 0, "progress": 0,
    "util": 1, "formats": 2, "core": 3, "sources": 4, "mapping": 5, "sinks": 6,
    "api": 7, "cli": 7, "verification": 7, "workers": 7, "testing": 7, "__init__": 7, "__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every run-time import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("shardconv")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("shardconv"):
                found += [(module, a.name, node.lineno) for a in node.names]
    return found


def _graph() -> tuple[set[str], dict[str, list[tuple[str, str | None, int]]]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, list[tuple[str, str | None, int]]] = {}
    for name, path in modules.items():
        out = []
        for module, imported, line in _imports(path):
            sub = f"{module}.{imported}" if imported else None
            target = sub if sub in modules else module
            out.append((target, None if target == sub else imported, line))
        edges[name] = out
    return set(modules), edges


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def test_every_module_has_a_layer() -> None:
    modules, _ = _graph()
    assert not {m.split(".")[1] for m in modules if "." in m} - set(LAYERS)


def test_no_module_imports_a_higher_layer() -> None:
    _, edges = _graph()
    bad = [f"{m} line {line} imports {t}" for m, out in edges.items() for t, _, line in out
           if t != "shardconv" and _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_across_packages() -> None:
    _, edges = _graph()
    bad = [f"{m} line {line} imports {t}.{name}" for m, out in edges.items() for t, name, line in out
           if name and name.startswith("_") and not name.startswith("__") and _package(t) != _package(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    modules, edges = _graph()
    graph = {m: {t for t, _, _ in edges[m] if t in modules and t != m} for m in modules}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("broken", ["cycle", "layer", "private"])
def test_the_walker_sees_each_kind_of_violation(tmp_path: Path, broken: str) -> None:
    """The checks above fail on a tree that breaks them (a check that cannot fail is no check)."""
    tree = tmp_path / "shardconv"
    for pkg in ("util", "core", "sinks"):
        (tree / pkg).mkdir(parents=True)
        (tree / pkg / "__init__.py").write_text("")
    (tree / "__init__.py").write_text("")
    (tree / "util" / "a.py").write_text("from ..core import b\n" if broken == "layer" else "")
    (tree / "core" / "b.py").write_text("from . import c\n")
    (tree / "core" / "c.py").write_text("from . import b\n" if broken == "cycle" else "")
    (tree / "sinks" / "d.py").write_text("from ..core.b import _hidden\n" if broken == "private" else "")
    globals()["PACKAGE"] = tree
    try:
        check = {"cycle": test_no_import_cycle, "layer": test_no_module_imports_a_higher_layer,
                 "private": test_no_private_name_is_imported_across_packages}[broken]
        with pytest.raises(AssertionError):
            check()
    finally:
        globals()["PACKAGE"] = Path(__file__).resolve().parent.parent / "shardconv"


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_60_lines() -> None:
    """Long functions hide the steps a newcomer needs to see; split them into named ones."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)
