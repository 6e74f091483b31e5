"""The import graph of ``fastpref`` (its own modules; ``fastpref.kernels`` lives in the top-level ``kernels/``
folder) has no cycles. Edges come from each module's source, parsed with ``ast``: every ``import`` and
``from ... import`` statement, at module level or inside a function, that names a fastpref module. A name
imported from a package counts as an edge to the submodule of that name when one exists, else to the
package itself; importing a submodule also imports its parent packages, but those edges are left out (a
package's ``__init__`` is a namespace, not a dependency of its children)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"fastpref": ROOT / "fastpref", "fastpref.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """{dotted module name: source file} of every module of the package."""
    found: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "fastpref" and parts[:1] == ["kernels"]:
                continue
            found[name] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the fastpref modules it imports}."""
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if _is_package(path) else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                for a in node.names:
                    sub = f"{stem}.{a.name}"
                    targets.add(sub if sub in mods else stem)
        out[name] = {t for t in targets if t in mods and t != name}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_finder_sees_a_cycle():
    """The checker itself: a two-module circle and a function-level import are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    tree = ast.parse("def f():\n    from .loop import train\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "loop" for n in ast.walk(tree))


def test_known_edges_are_seen():
    """Edges of every kind are collected (module-level, function-level, relative, absolute)."""
    g = edges(modules())
    assert "fastpref.train.config" in g["fastpref.train.online.config"]  # module level, relative
    assert "fastpref.train" in g["fastpref.cli"]  # function level


def test_no_import_cycles():
    found = cycles(edges(modules()))
    assert not found, "import cycles in fastpref: " + "; ".join(" <-> ".join(c) for c in found)
