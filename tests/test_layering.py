"""The package's layering: no import cycle, and nothing under ``minitron/`` imports the CLI except the CLI.

The CLI (``minitron/cli/``) sits on top: it may import any library module, and no library module may import
it (not even lazily inside a function). Imports must form no cycle, lazy ones included: the whole module's
AST is read, so an import inside a function body, a method, a lambda's default, a ``TYPE_CHECKING`` block
or an ``importlib.import_module("minitron...")`` call is an edge like a module-level one (a lazy import
that only hides a cycle is still a cycle: the two modules cannot be understood or moved apart). Counting that importing
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


def _imports(name: str, source: str | None = None, is_package: bool | None = None,
             modules: dict | None = None) -> set[str]:
    """Modules under ``minitron`` that module ``name`` imports anywhere in its source (``import x`` /
    ``from x import y``, relative too, at module level or inside any function; ``importlib.import_module``
    with a literal name). ``source`` / ``is_package`` default to the module's file, ``modules`` (the names a
    ``from package import name`` may be a module of) to ``MODULES``."""
    modules = MODULES if modules is None else modules
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8") if source is None else source)
    is_package = _is_package(name) if is_package is None else is_package
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if (isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None))
                    == "import_module" and child.args and isinstance(child.args[0], ast.Constant)
                    and isinstance(child.args[0].value, str)):
                found.add(child.args[0].value)
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
                found.update(f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in modules)
            visit(child)

    visit(tree)
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph(sources: dict[str, tuple[str, bool]] | None = None) -> dict[str, set[str]]:
    """``module -> modules it imports`` over ``MODULES``, or over ``sources`` (``name -> (source, is_package)``)."""
    graph: dict[str, set[str]] = {}
    modules = MODULES if sources is None else sources
    for name in modules:
        edges = set()
        src, pkg = sources[name] if sources is not None else (None, None)
        for target in _imports(name, src, pkg, modules):
            while target not in modules and "." in target:  # `import a.b.name` where name is an attribute
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
    offenders = {name: sorted(m for m in _imports(name) if m == CLI or m.startswith(CLI + "."))
                 for name in MODULES if not (name == CLI or name.startswith(CLI + "."))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_parser_sees_lazy_imports_and_their_cycles():
    """A cycle closed only by an import inside a function body (or a lambda, or importlib) is found."""
    graph = _graph()
    assert "minitron.pruning.target" in graph["minitron.pruning.sizing"]  # relative imports
    assert "minitron.pruning.params" in graph["minitron.cli.prune"]  # an import inside a function body
    lazy = {
        "minitron.fake_a": ("from .fake_b import thing\n", False),
        "minitron.fake_b": ("def thing():\n    from . import fake_c\n", False),
        "minitron.fake_c": ("f = lambda: __import__('importlib').import_module('minitron.fake_a')\n", False),
        "minitron.fake_d": ("def g():\n    class K:\n        def m(self):\n            from .fake_a import x\n", False),
    }
    assert _cycles(_graph(lazy)) == [["minitron.fake_a", "minitron.fake_b", "minitron.fake_c"]]


def test_imports_have_no_cycle_lazy_imports_included():
    assert _cycles(_graph()) == []


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


MAX_MODULE_LINES = 400  # small modules, one job each


def test_no_module_over_400_lines():
    files = [*MODULES.values(), *(PACKAGE_DIR.parent / "kernels" / "minitron_kernels").glob("*.py")]
    long = {str(p.relative_to(PACKAGE_DIR.parent)): n for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_one_home_per_helper():
    """Names the review found defined twice (issue 24) are defined once in the package."""
    defined: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(name)
    twice = {n: defined.get(n) for n in ("load_tokenizer", "check_device", "_layer_io", "layer_io", "layer_output",
                                         "count_parameters", "target_parameters", "ParamCounter", "budget_of",
                                         "default_hidden_divisor") if len(defined.get(n, [])) != 1}
    assert twice == {"_layer_io": None}
