"""Native ops for minitron: ``torch.ops.minitron.*``, always defined, C++/CUDA kernels when built.

* :mod:`minitron.ops.library` -- schema, fake kernel and pure-PyTorch kernel of
  ``minitron::compact_``, registered at import; the C++/CUDA extension (``csrc/``, found or
  JIT-built by :mod:`minitron.ops._loader` from :mod:`minitron.ops.build_spec`) adds CPU/CUDA kernels.
* :func:`minitron.ops.gather.compact_` -- in-place structured row/column gather.
* :func:`minitron.ops.gather.gather_backend` -- which implementation runs on a device.
"""

from . import library  # noqa: F401 - defines torch.ops.minitron.compact_ before anything else
from .gather import CompactFallbackWarning, compact_, gather_backend

__all__ = ["compact_", "gather_backend", "CompactFallbackWarning"]
