"""The design's import rules, checked on the source: search/ and backends/ never import a technique module
(they go through the pipeline, the registry and the lowering spec), and autocompress has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autocompress"

# cycles known to be removed by a parallel branch (delete the entry after merging it)
ALLOWED_CYCLES: set[frozenset[str]] = set()  # none: every import (TYPE_CHECKING ones too) runs one way


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every ``autocompress.*`` module imported anywhere in the file (module level and inside functions),
    relative imports resolved; ``from x import y`` counts ``x.y`` when that is a module, else ``x``."""
    known = _modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "autocompress"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "autocompress":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out |= subs or {target}
            if len(subs) < len(node.names):
                out.add(target)
    return {m for m in out if m != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for name, path in known.items():
        targets = set()
        for m in _imports(name, path):
            while m and m not in known:  # autocompress.x.y where y is a name: the module x
                m = m.rpartition(".")[0]
            if m and m != name:
                targets.add(m)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One import cycle through the component, as ``a -> b -> a``."""
    members, start = set(component), component[0]
    seen, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return " -> ".join([*seen[v], start])
                if w not in seen:
                    seen[w] = [*seen[v], w]
                    nxt.append(w)
        frontier = nxt
    return " <-> ".join(component)


@pytest.mark.parametrize("package", ["autocompress.search", "autocompress.backends"])
def test_search_and_backends_never_import_a_technique(package):
    bad = {
        name: sorted(m for m in _imports(name, path) if m.startswith("autocompress.techniques"))
        for name, path in _modules().items()
        if name == package or name.startswith(package + ".")
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"modules of {package} import techniques directly: {bad}"


def test_no_import_cycle():
    graph = _graph()
    cycles = [c for c in _cycles(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not cycles, "import cycles: " + "; ".join(_path(graph, c) for c in cycles)


def test_the_checker_sees_relative_and_function_level_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _path(graph, ["a", "b", "c"]) == "a -> b -> c -> a"
    imports = _imports("autocompress.search.preflight", PACKAGE / "search" / "preflight.py")
    assert "autocompress.registry" in imports and "autocompress.space" in imports  # relative, module level
    inner = _imports("autocompress.backends.amct", PACKAGE / "backends" / "amct.py")
    assert "autocompress.backends.onnxruntime" in inner  # imported inside a function


def test_tests_mirror_the_package():
    """Every folder of tests/ is a subpackage of autocompress/ (tests/backends/ for autocompress/backends/)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders, "tests/ has no subfolders: it does not mirror the package"
    assert folders <= subpackages, (
        f"tests/ folders without an autocompress subpackage: {folders - subpackages}"
    )
