"""Whether the Triton kernels can run in this test process (shared by the kernel test modules)."""

from __future__ import annotations

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
