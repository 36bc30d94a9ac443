"""No import cycle in rabbit_store, checked on a static import graph built from the sources.

Why static: importing each module alone in a fresh process passes whenever *some* order works, and
Python tolerates many cycles until the day a name is used before its module finished executing.
The graph counts every import statement (function-level ones too, except under TYPE_CHECKING),
so a cycle is caught when it is written, not when it first breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rabbit_store

SOURCE_ROOT = Path(rabbit_store.__file__).resolve().parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every module and package under `root` (the package directory)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join([package, *parts])] = path
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports.

    `from X import a` is an edge to X.a when that is a module, else to X; the parent packages
    Python initialises on the way are not edges (every submodule would otherwise form a "cycle"
    with an `__init__` that imports it), unless a name is imported from them.
    """
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    targets.append(child if child in modules else source)
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path whose last module is its first), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_rabbit_store_has_no_import_cycle():
    graph = import_graph(SOURCE_ROOT, "rabbit_store")
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_graph_sees_the_real_imports():
    graph = import_graph(SOURCE_ROOT, "rabbit_store")
    assert len(graph) >= 20
    assert "rabbit_store.verify" in graph["rabbit_store.index"]  # `from . import verify`
    assert "rabbit_store.sources" in graph["rabbit_store.destination"]
    assert "rabbit_store.sources.fsspec_source" in graph["rabbit_store.sources.hub"]
    assert "rabbit_store.split.splitter" in graph["rabbit_store.split"]


def test_the_registry_imports_no_backend():
    """Backends are named by dotted path, never imported by the registry (fsspec's model)."""
    graph = import_graph(SOURCE_ROOT, "rabbit_store")
    backends = {
        "rabbit_store.sources.hub",
        "rabbit_store.sources.local",
        "rabbit_store.sources.fsspec_source",
    }
    assert not graph["rabbit_store.sources.registry"] & backends
    assert "rabbit_store.sources.hub" not in graph["rabbit_store.sources"]


def test_a_cycle_is_found(tmp_path: Path):
    """The check can fail: a package whose submodule imports a name back from its __init__."""
    pkg = tmp_path / "cyclic"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .sub import thing\n")
    (pkg / "sub" / "__init__.py").write_text("from .impl import thing\n")
    (pkg / "sub" / "impl.py").write_text(
        "def thing():\n    from .. import other\n    return other\n"
    )
    (pkg / "other.py").write_text("import cyclic.sub.impl\n")
    (pkg / "fine.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cyclic\n"
    )
    graph = import_graph(pkg, "cyclic")
    assert graph["cyclic.fine"] == set()
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert {"cyclic.other", "cyclic.sub.impl"} <= set(cycle)
