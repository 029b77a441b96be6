"""Native ops for minitron (C++/CUDA torch extension with a pure-PyTorch fallback).

* :func:`minitron.ops.gather.compact_` -- in-place structured row/column gather.
* :func:`minitron.ops.gather.gather_backend` -- which implementation runs on a device.
"""

from .gather import CompactFallbackWarning, compact_, gather_backend

__all__ = ["compact_", "gather_backend", "CompactFallbackWarning"]
