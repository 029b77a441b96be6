"""Whether the Triton kernels can run in this test process (shared by the kernel test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_runnable() -> bool:
    """Triton kernels can run here: CUDA, or CPU with triton imported in interpreter mode."""
    if not have_triton():
        return False
    if torch.cuda.is_available():
        return True
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def rerun_in_interpreter(test_file: str, keyword: str, allow_skips: bool = True) -> None:
    """Run ``test_file``'s tests matching ``keyword`` in a fresh pytest process with TRITON_INTERPRET=1.

    For a process that imported triton before the interpreter flag was set (the flag is read at
    import). Fails with the end of the child's output unless it passed (and, when
    ``allow_skips`` is False, skipped nothing).
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", keyword]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
    if not allow_skips:
        assert " skipped" not in r.stdout, r.stdout[-4000:]
