"""The fused CPU kernel of the KD chunk's softmax/KL pass (``csrc/kd_cpu.cpp``) and when it runs.

For the default loss (forward KL) on CPU, :func:`minitron.losses.kd.op.kd_chunk` runs the chunk's
whole elementwise pass in one C++ kernel (AVX-512 rows: three reads of each logits row, one write, no
(c, V) temporaries) instead of the ~10 torch ops of :func:`~minitron.losses.kd.reference.kd_chunk_reference`;
about 3x faster on the (1024, 49152) chunk of SmolLM2 (``benchmarks/kd_loss_cpu.py``). It computes the
same quantities in fp32 with fp64 row sums and is tested against the reference
(``tests/kernels/test_kd_cpu_kernel.py``). The reference runs instead when the kernel does not apply:
another loss (reverse KL, JSD), student and teacher vocabularies of different sizes, a CPU without
AVX-512, the extension not built, or ``MINITRON_KD_CPU_KERNEL=0``.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from minitron.losses.kd.reference import FORWARD_KL

__all__ = ["cpu_kernel", "cpu_kernel_applies"]


@functools.lru_cache(maxsize=None)
def _loaded() -> Optional[Callable[..., torch.Tensor]]:
    from minitron.ops._loader import load_extension

    ext = load_extension()
    if ext is None or not hasattr(ext, "kd_forward_kl_chunk_") or not ext.kd_forward_kl_fast_available():
        return None
    return ext.kd_forward_kl_chunk_


def cpu_kernel() -> Optional[Callable[..., torch.Tensor]]:
    """``kd_forward_kl_chunk_(s, t, row_scale, temperature) -> loss`` of the extension, or None where it cannot run.

    Returns:
        The kernel (it overwrites ``s`` with the gradient when ``row_scale`` is given), or None when the
        extension is not built, this CPU has no AVX-512, or ``MINITRON_KD_CPU_KERNEL=0``.
    Example:
        >>> fn = cpu_kernel()
        >>> loss = fn(s.clone(), t.clone(), None, 1.0) if fn else None
    """
    if os.environ.get("MINITRON_KD_CPU_KERNEL", "1") == "0":
        return None
    return _loaded()


def cpu_kernel_applies(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: int) -> bool:
    """Whether the fused CPU kernel computes this chunk (forward KL, fp32 CPU logits of one shape, contiguous)."""
    return (kind == FORWARD_KL and s_logits.device.type == "cpu" and s_logits.dtype == torch.float32
            and t_logits.dtype == torch.float32 and s_logits.shape == t_logits.shape
            and s_logits.is_contiguous() and t_logits.is_contiguous() and cpu_kernel() is not None)
