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

Interrupted builds: torch's JIT build guards its folder with a plain ``lock`` file that it removes
when the build ends; a build killed mid-way (SIGKILL, a closed terminal) leaves it, and every later
``load()`` would poll it forever. Every minitron build therefore first takes an OS file lock
(``fcntl.flock`` on ``.minitron-build.flock`` in the same folder), which the kernel drops when its
holder dies. Holding it, a ``lock`` file can only be a dead build's: it is removed with a warning
naming it. Waiting for another live build is bounded by ``MINITRON_EXT_LOCK_TIMEOUT`` seconds
(default 600); past that the pure-PyTorch kernel is used, with a warning naming the lock file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

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


TORCH_BUILD_LOCK = "lock"  # the FileBaton of torch.utils.cpp_extension._jit_compile
BUILD_FLOCK = ".minitron-build.flock"
DEFAULT_LOCK_TIMEOUT_S = 600.0


def _lock_timeout_s() -> float:
    raw = os.environ.get("MINITRON_EXT_LOCK_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"MINITRON_EXT_LOCK_TIMEOUT={raw!r} is not a number of seconds") from None


@contextlib.contextmanager
def _exclusive_build(build_dir: Path, timeout_s: float) -> Iterator[None]:
    """Hold the folder's build lock; clear torch's ``lock`` file when its owner is gone.

    Raises:
        TimeoutError: another live build held the folder for ``timeout_s`` (names the lock file).
    """
    torch_lock = build_dir / TORCH_BUILD_LOCK
    try:
        import fcntl
    except ImportError:  # no flock (Windows): a bounded wait on torch's own lock file
        deadline = time.monotonic() + timeout_s
        while torch_lock.exists():
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the extension build folder is locked by {torch_lock} for over {timeout_s:.0f} s; "
                    "if no other build is running, delete that file") from None
            time.sleep(0.2)
        yield
        return

    flock_path = build_dir / BUILD_FLOCK
    fd = os.open(flock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another process has been building the extension in {build_dir} for over "
                        f"{timeout_s:.0f} s (it holds {flock_path}); raise MINITRON_EXT_LOCK_TIMEOUT to wait "
                        "longer") from None
                time.sleep(0.2)
        # Every minitron build holds the flock for its whole duration, and the kernel drops it when the
        # holder dies: a torch lock file seen now was left by a build that was killed.
        if torch_lock.exists() or torch_lock.is_symlink():
            warnings.warn(f"minitron: removing the stale build lock {torch_lock} (an earlier extension build "
                          "was interrupted); rebuilding", RuntimeWarning, stacklevel=4)
            torch_lock.unlink()
        yield
    finally:
        os.close(fd)  # releases the flock


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load

    csrc = build_spec.csrc_dir()
    if csrc is None:
        raise FileNotFoundError("C++ sources not found (neither minitron/_csrc nor the repo's csrc/)")
    with_cuda = _cuda_build_possible()
    build_dir = _cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_build(build_dir, _lock_timeout_s()):
        return load(
            name=build_spec.JIT_NAME,
            sources=[str(csrc / s) for s in build_spec.sources(with_cuda)],
            extra_cflags=build_spec.cxx_flags(with_cuda),
            extra_cuda_cflags=build_spec.nvcc_flags() if with_cuda else None,
            extra_include_paths=[str(csrc)],
            build_directory=str(build_dir),
            verbose=os.environ.get("MINITRON_EXT_VERBOSE", "0") == "1",
        )


def _prebuilt_spec():
    """The import spec of the binary ``setup.py`` built, located without loading it (None: not built)."""
    return importlib.util.find_spec("minitron._C")


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
        spec = _prebuilt_spec()
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
                f"({_STATE['error'][:800]}); compact_ uses its slower pure-PyTorch kernel "
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
