"""Private: locate / build the ``minitron`` C++/CUDA extension (torch.ops.minitron.*).

Order of attempts (first success wins, result cached for the process):

1. ``import minitron._C`` -- prebuilt by ``setup.py`` (``pip install -e . --no-build-isolation``),
   if the binary carries this source tree's ``build_spec.EXT_ABI`` tag (checked before loading:
   a build from older sources that still defined the op schema would abort the process).
2. JIT build with :func:`torch.utils.cpp_extension.load` (ninja) from the C++/CUDA sources
   (the repo's ``csrc/``, or ``minitron/_csrc`` in an installed wheel; the build is described
   once, in :mod:`minitron.ops.build_spec`, for this and ``setup.py``) into a cache dir (``$MINITRON_EXT_DIR`` or ``~/.cache/minitron/ext/<py>-<torch>-<cpu|cuXY>``).
   CUDA sources are included only when ``torch.version.cuda`` and a CUDA toolkit (CUDA_HOME)
   are both present. Nothing is ever downloaded.
3. Give up: ``load_extension()`` returns ``None`` and ``torch.ops.minitron.compact_`` runs its
   pure-PyTorch kernel (a single ``warnings.warn`` says so). The op itself, its schema and its
   fake kernel are always defined by :mod:`minitron.ops.library`; the extension only adds the
   CPU/CUDA kernels.

``MINITRON_GATHER_BACKEND=torch`` skips 1-2 entirely (forces the fallback);
``MINITRON_NO_JIT=1`` skips step 2 only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import build_spec, library  # noqa: F401 - library: the op is defined before any kernel is added

_LOCK = threading.Lock()
_STATE: dict = {"tried": False, "module": None, "error": None}


def forced_torch_fallback() -> bool:
    """True when ``MINITRON_GATHER_BACKEND`` asks for the pure-PyTorch path."""
    return os.environ.get("MINITRON_GATHER_BACKEND", "auto").strip().lower() in {
        "torch",
        "torch-fallback",
        "fallback",
    }


def _cuda_build_possible() -> bool:
    if not torch.version.cuda:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _cache_dir() -> Path:
    env = os.environ.get("MINITRON_EXT_DIR")
    if env:
        return Path(env)
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if _cuda_build_possible() else "cpu"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}-{flavour}"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "minitron" / "ext" / tag


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    csrc = build_spec.csrc_dir()
    if csrc is None:
        raise FileNotFoundError("C++ sources not found (neither minitron/_csrc nor the repo's csrc/)")
    with_cuda = _cuda_build_possible()
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name=build_spec.JIT_NAME,
        sources=[str(csrc / s) for s in build_spec.sources(with_cuda)],
        extra_cflags=build_spec.cxx_flags(with_cuda),
        extra_cuda_cflags=build_spec.nvcc_flags() if with_cuda else None,
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        verbose=os.environ.get("MINITRON_EXT_VERBOSE", "0") == "1",
    )


def load_extension() -> Optional[ModuleType]:
    """Return the loaded extension module (ops registered), or ``None`` if unavailable."""
    if forced_torch_fallback():
        return None
    if _STATE["tried"]:
        return _STATE["module"]
    with _LOCK:
        if _STATE["tried"]:
            return _STATE["module"]
        mod = None
        errors = []
        spec = importlib.util.find_spec("minitron._C")  # locates the binary without loading it
        if spec is None or spec.origin is None:
            errors.append("prebuilt minitron._C: not built")
        elif not build_spec.abi_matches(spec.origin):
            errors.append(f"prebuilt {spec.origin} was built from other sources (no {build_spec.EXT_ABI_TAG!r}); "
                          "rebuild it with `pip install -e . --no-build-isolation`")
        else:
            try:
                from minitron import _C as mod  # type: ignore[attr-defined,no-redef]
            except ImportError as e:  # built for another torch, ...
                errors.append(f"prebuilt minitron._C: {e}")
                mod = None
        if mod is None and os.environ.get("MINITRON_NO_JIT", "0") != "1":
            try:
                mod = _jit_build()
            except Exception as e:  # compiler missing, build error, ...
                errors.append(f"JIT build: {type(e).__name__}: {e}")
                mod = None
        if mod is None:
            _STATE["error"] = "; ".join(errors) or "disabled by MINITRON_NO_JIT=1"
            warnings.warn(
                "minitron: C++ gather extension unavailable "
                f"({_STATE['error'][:500]}); compact_ uses its slower pure-PyTorch kernel "
                "(same results, chunked copies). Install a C++ compiler + ninja, or build with "
                "`pip install -e . --no-build-isolation`.",
                RuntimeWarning,
                stacklevel=3,
            )
        _STATE["module"] = mod
        _STATE["tried"] = True
        return mod


def has_kernel(device_type: str) -> bool:
    """Whether ``minitron::compact_`` has a C++ kernel for ``device_type`` ('cpu'/'cuda')."""
    if load_extension() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("minitron::compact_", key))
