"""Kernel tests (Triton kernels, the native ``minitron::compact_`` op): Triton interpreter set-up.

Without a CUDA GPU the Triton kernels run on the CPU in interpreter mode. Triton reads
``TRITON_INTERPRET`` once, when it is first imported (transformers imports it too), so the flag
is set here, at conftest import: pytest imports this file before collecting any test module of
this directory (and, for a whole-suite run, before the other test modules, which it collects
after ``kernels/``). This is the only place the test suite sets it; a process that imported
triton earlier is detected by :func:`tests.helpers.triton_runnable` and the kernel tests re-run
themselves in a fresh interpreter process (:func:`tests.helpers.rerun_in_interpreter`).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
