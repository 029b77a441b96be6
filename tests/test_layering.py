"""The package's layering: no import cycle, and nothing under ``minitron/`` imports the CLI except the CLI.

The CLI (``minitron/cli/``) sits on top: it may import any library module, and no library module may import
it (not even lazily inside a function). Module-level imports must form no cycle, counting that importing
``a.b.c`` first imports the package ``a.b`` (the root ``minitron/__init__.py``, a facade of re-exports,
is left out of those implicit edges; explicit imports of it count; a module's imports from its own
enclosing packages, ``from . import sibling``, run while those packages are being imported and add no edge).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import minitron

PACKAGE_DIR = Path(minitron.__file__).resolve().parent
ROOT = "minitron"
CLI = "minitron.cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str, module_level_only: bool) -> set[str]:
    """Modules under ``minitron`` that module ``name`` imports (``import x`` / ``from x import y``, relative too)."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if _is_package(name) else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue  # runs when called, not at import
            if module_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in MODULES)
            visit(child)

    visit(tree)
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        edges = set()
        for target in _imports(name, module_level_only=True):
            while target not in MODULES and "." in target:  # `import a.b.name` where name is an attribute
                target = target.rpartition(".")[0]
            if target in _ancestors(name):  # `from . import sibling`: the own package is already being imported
                continue
            edges.add(target)
            # importing a.b.c runs a/b/__init__.py first, unless it is already being imported (our own package)
            edges.update(a for a in _ancestors(target) if a != ROOT and a not in _ancestors(name) and a != name)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_library_module_imports_the_cli():
    offenders = {name: sorted(m for m in _imports(name, module_level_only=False) if m == CLI or m.startswith(CLI + "."))
                 for name in MODULES if not (name == CLI or name.startswith(CLI + "."))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_module_level_imports_have_no_cycle():
    graph = _graph()
    assert "minitron.pruning.target" in graph["minitron.sizing"]  # the parser sees relative imports
    assert _cycles(graph) == []


def test_every_module_imports_in_a_fresh_interpreter_without_the_cli():
    """Import every library module (not the CLI) in a new process: all succeed and ``minitron.cli`` stays unloaded;
    then the CLI modules import too."""
    library = sorted(n for n in MODULES if not (n == CLI or n.startswith(CLI + ".")) and not n.endswith("__main__"))
    cli = sorted(n for n in MODULES if (n == CLI or n.startswith(CLI + ".")) and not n.endswith("__main__"))
    code = f"""
import importlib, json, sys
errors = {{}}
for name in {library!r}:
    try:
        importlib.import_module(name)
    except Exception as err:
        errors[name] = repr(err)
cli_loaded = sorted(m for m in sys.modules if m == {CLI!r} or m.startswith({CLI!r} + "."))
for name in {cli!r}:
    try:
        importlib.import_module(name)
    except Exception as err:
        errors[name] = repr(err)
print(json.dumps({{"errors": errors, "cli_loaded_by_library": cli_loaded}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"errors": {}, "cli_loaded_by_library": []}
    assert len(library) > 30 and {"minitron.cli.prune", "minitron.cli.distill", "minitron.cli.search"} <= set(cli)
