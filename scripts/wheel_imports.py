"""The third-party modules a module of a wheel reaches through its imports, read from the
wheel's source without importing anything (the lent GPU machine has no network, so a module
missing there costs a device call to find):

    python3 scripts/wheel_imports.py .whl/all/vllm-0.24.0-*.whl \\
        vllm.entrypoints.openai.api_server --deep vllm.entrypoints --skip vllm.entrypoints.cli

Follows the package's own imports from ``module``: those at module level everywhere, and
those inside functions too in the modules under each ``--deep`` prefix (vLLM's app factory
imports its routers inside ``build_app``); relative imports resolved; imports under
``TYPE_CHECKING`` and inside ``try`` (optional, guarded where they are made) left out. Prints
each third-party top-level name that is not in the standard library, with a module that
imports it; ``--have`` names (what the staged wheels and the machine's own site-packages
provide) are left out.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile


def _imports(tree: ast.Module, module: str, is_pkg: bool, deep: bool) -> list[str]:
    out: list[str] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Try):  # an optional import: guarded where it is made
                continue
            if isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                name = node.module or ""
                if node.level:
                    base = module.split(".")[: None if is_pkg else -1]
                    base = base[: len(base) - (node.level - 1)]
                    name = ".".join([*base, name] if name else base)
                out.append(name)
                out.extend(f"{name}.{a.name}" for a in node.names)
            if deep or isinstance(node, (ast.If, ast.With)):
                visit([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)])

    visit(tree.body)
    return out


def reached(wheel: str, start: str, deep: list[str], skip: list[str]) -> dict[str, str]:
    """Each third-party top-level name reached from ``start`` -> a module importing it."""
    with zipfile.ZipFile(wheel) as z:
        files = {n for n in z.namelist() if n.endswith(".py")}
        package = start.split(".")[0]
        seen: set[str] = set()
        third: dict[str, str] = {}
        todo = [start]
        while todo:
            mod = todo.pop()
            if mod in seen or any(mod.startswith(s) for s in skip):
                continue
            seen.add(mod)
            parts = mod.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
            path = mod.replace(".", "/")
            is_pkg = f"{path}/__init__.py" in files
            source = f"{path}/__init__.py" if is_pkg else f"{path}.py"
            if source not in files:  # a name imported from a module, or not in the wheel
                continue
            try:
                tree = ast.parse(z.read(source))
            except SyntaxError:
                continue
            for name in _imports(tree, mod, is_pkg, any(mod.startswith(d) for d in deep)):
                top = name.split(".")[0]
                if top == package:
                    todo.append(name)
                elif top and top not in sys.stdlib_module_names:
                    third.setdefault(top, mod)
    return third


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel")
    ap.add_argument("module")
    ap.add_argument("--deep", action="append", default=[])
    ap.add_argument("--skip", action="append", default=[])
    ap.add_argument("--have", nargs="*", default=[])
    args = ap.parse_args()
    for name, by in sorted(reached(args.wheel, args.module, args.deep, args.skip).items()):
        if name not in args.have:
            print(f"{name:40} {by}")


if __name__ == "__main__":
    main()
