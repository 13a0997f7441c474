"""The package's shape holds: no import circles, and the layers import only downwards
(protocol <- serve, protocol <- client, never serve <-> client; the runtime never imports the
build side). Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import edge_sdk

ROOT = Path(edge_sdk.__file__).parent


def _import_graph() -> dict[str, set[str]]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ["edge_sdk", *f.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    graph: dict[str, set[str]] = {}
    for name, f in mods.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                cands = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            deps.update(c for c in cands if c in mods and c != name)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _imports_under(graph: dict[str, set[str]], src: str, dst: str) -> list[tuple[str, str]]:
    return [(m, d) for m, deps in graph.items() if m.startswith(src) for d in deps if d.startswith(dst)]


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ that re-exports its own modules is not a circle with them."""
    return {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}


def test_no_import_circles():
    assert _cycles(_without_package_inits(_import_graph())) == []


def test_layers_import_downwards():
    g = _import_graph()
    assert _imports_under(g, "edge_sdk.protocol", "edge_sdk.serve") == []
    assert _imports_under(g, "edge_sdk.protocol", "edge_sdk.client") == []
    assert _imports_under(g, "edge_sdk.client", "edge_sdk.serve") == []
    assert _imports_under(g, "edge_sdk.serve", "edge_sdk.client") == []
    for build_side in ("edge_sdk.compile", "edge_sdk.build", "edge_sdk.quant", "edge_sdk.export",
                       "edge_sdk.plugins.library", "edge_sdk.plugins.reference", "edge_sdk.golden"):
        assert _imports_under(g, "edge_sdk.runtime", build_side) == []
