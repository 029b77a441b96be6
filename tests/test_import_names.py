"""No top-level name of the checkout shadows a module of an installed distribution.

Whenever the checkout root is on ``sys.path`` (``python -m ...`` from the root, pytest's rootdir
insertion for ``tests/__init__.py``, ``PYTHONPATH=.``), every ``*.py`` file and every folder there is
importable under its own name. A regular package (folder with ``__init__.py``) or a module named like
an installed distribution's top-level module hides the installed one: a top-level ``kernels/`` package
hid Hugging Face's ``kernels``, which transformers >= 5.25 imports, and broke every model build. A
folder without ``__init__.py`` is only a namespace portion, which a regular package found anywhere on
the path outranks; it is still checked by resolving the name from the root.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "minitron"


def _root_import_names() -> dict[str, str]:
    """Importable top-level names of the checkout root -> 'module' | 'package' | 'namespace'."""
    names: dict[str, str] = {}
    for entry in ROOT.iterdir():
        if entry.is_file() and entry.suffix == ".py" and entry.stem.isidentifier():
            names[entry.stem] = "module"
        elif entry.is_dir() and entry.name.isidentifier():
            names[entry.name] = "package" if (entry / "__init__.py").exists() else "namespace"
    return names


def _foreign_top_level_modules() -> dict[str, list[str]]:
    """Top-level import names of installed distributions other than minitron itself."""
    out = {}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d.lower() != OWN_DISTRIBUTION]
        if others:
            out[name] = others
    return out


def test_no_regular_package_or_module_shadows_an_installed_distribution():
    foreign = _foreign_top_level_modules()
    assert "torch" in foreign and "transformers" in foreign  # the metadata really was read
    clashes = {name: (kind, foreign[name]) for name, kind in _root_import_names().items()
               if kind != "namespace" and name in foreign}
    assert not clashes, (
        f"top-level names of the checkout shadow installed distributions: {clashes}; move the code into a "
        "source folder (as kernels/minitron_kernels/) or rename it")


def test_installed_modules_resolve_to_site_packages_from_the_checkout_root():
    """Resolve every clashing name (namespace folders included) the way ``python -m`` from the root does."""
    foreign = _foreign_top_level_modules()
    names = sorted(n for n in _root_import_names() if n in foreign)
    probe = (
        "import importlib.util, json, sys\n"
        f"names = {names!r}\n"
        "print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) or "
        "str(list(getattr(importlib.util.find_spec(n), 'submodule_search_locations', []) or [])) for n in names}))\n"
    )
    # '' first on sys.path, with the root as the working directory: what python -m and python -c see
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    origins = json.loads(result.stdout)
    inside = {n: o for n, o in origins.items() if str(ROOT) in o and "site-packages" not in o}
    assert not inside, f"from the checkout root these installed modules resolve into the repo: {inside}"


def test_transformers_builds_a_model_from_the_checkout_root():
    """transformers >= 5.25 imports Hugging Face's ``kernels`` while building a model class."""
    code = (
        "import transformers, minitron, minitron_kernels\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, vocab_size=64))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
