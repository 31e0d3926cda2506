"""The package's layers import downward only, and the client stands alone.

Import edges are read from the source with ``ast``: module-level imports and imports inside
functions both count (a function-level import is a dependency that runs later, and a cycle
through one still ties the two layers together). Imports under ``if TYPE_CHECKING:`` do not:
they never run, and name types only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "weightsync"
# each of these packages is one node; every other module is a node of its own
PACKAGES = ("transport", "engine", "sources", "api", "rl", "testing")
LAYERED = ("weightsync.transport", "weightsync.engine", "weightsync.sources",
           "weightsync.messages")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _node(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] in PACKAGES else module


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Every module ``tree`` imports (absolute names), and the line, skipping TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            yield from (i for child in node.orelse for i in _imports(child, module, is_package))
            continue
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, node.lineno
            yield from ((f"{name}.{a.name}", node.lineno) for a in node.names)
        yield from _imports(node, module, is_package)


def _graph() -> dict[str, dict[str, list[str]]]:
    """node -> imported node -> where ("module:line")."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, dict[str, list[str]]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for name, line in _imports(tree, module, path.name == "__init__.py"):
            while name not in files and "." in name:  # a name imported from a module
                name = name.rsplit(".", 1)[0]
            if name in files and _node(name) != _node(module):
                graph.setdefault(_node(module), {}).setdefault(_node(name), []).append(
                    f"{module}:{line}")
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_transport_engine_sources_and_messages_import_no_cycle():
    graph = _graph()
    tied = [c for c in _cycles(graph) if sum(n in LAYERED for n in c) > 1]
    where = {f"{a} -> {b}": graph[a][b][:3] for c in tied for a in c for b in graph.get(a, {})
             if b in c}
    assert not tied, f"import cycles {tied}: {where}"


def test_the_graph_sees_function_level_imports():
    # (the client imports the broadcast sender inside push_weights)
    assert "weightsync.transport" in _graph()["weightsync.client"]


def test_the_client_imports_without_the_app_the_coordinator_or_ray():
    code = ("import sys, weightsync.client; "
            "print(sorted(m for m in ('ray', 'fastapi', 'starlette', 'weightsync.coordinator', "
            "'weightsync.api.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
