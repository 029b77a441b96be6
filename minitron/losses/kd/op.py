"""``torch.ops.minitron.kd_chunk``: the KD chunk op as a torch.library custom op, and which kernel runs it.

One registered op (so ``torch.compile`` sees a single opaque node with a fake kernel instead of
tracing into Python or graph-breaking on Triton) with two kernels:

* the pure-PyTorch :func:`minitron.losses.kd.reference.kd_chunk_reference` (``impl="chunked"``), except
  that forward KL on CPU runs the fused C++ kernel of :mod:`minitron.losses.kd.cpu_kernel` (same
  contract, tested against the reference) where it is built and the CPU has AVX-512;
* the Triton kernel :func:`minitron_kernels.fused_kl.kd_chunk_triton` (``use_triton=True``: CUDA, or
  the CPU under ``TRITON_INTERPRET=1``), imported on first use, so CPU-only installs without triton
  import this module unchanged.

Contract (both kernels): the chunk's fp32 logits ``s_logits`` (c, Vs) / ``t_logits`` (c, Vt) are
overwritten; with a ``row_scale`` the gradient w.r.t. the student logits is written into ``grad``
(any float dtype, rounded once) or, when ``grad`` is None, over ``s_logits``; returns the per-token
loss (c,) fp32. Custom ops may not return an alias of an input, hence "written into", not returned.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from minitron.losses.kd.cpu_kernel import cpu_kernel, cpu_kernel_applies
from minitron.losses.kd.reference import kd_chunk_reference

__all__ = ["kd_chunk", "triton_chunk_fn"]


def triton_chunk_fn():
    """The Triton chunk launcher, or None when triton is not installed."""
    try:
        return importlib.import_module("minitron_kernels.fused_kl").kd_chunk_triton
    except ImportError:
        return None


@torch.library.custom_op("minitron::kd_chunk", mutates_args=("s_logits", "t_logits", "grad"))
def kd_chunk(s_logits: torch.Tensor, t_logits: torch.Tensor, row_scale: Optional[torch.Tensor],
             grad: Optional[torch.Tensor], kind: int, beta: float, temperature: float,
             use_triton: bool) -> torch.Tensor:
    """Per-token KD loss (c,) of one chunk; the student-logits gradient lands in ``grad`` or ``s_logits``.

    Args:
        s_logits: (c, Vs) fp32 student logits, overwritten (with the gradient when ``grad`` is None).
        t_logits: (c, Vt) fp32 teacher logits, overwritten.
        row_scale: (c,) fp32 weight of each row's loss in the gradient; None: loss only.
        grad: optional (c, Vs) buffer (e.g. bf16) that receives the gradient, rounded once.
        kind: ``FORWARD_KL`` | ``REVERSE_KL`` | ``JSD`` (:func:`minitron.losses.kd.reference.loss_kind`).
        beta: JSD mixing coefficient.
        temperature: softmax temperature tau (loss scaled by tau^2).
        use_triton: run the Triton kernel instead of the reference.
    Returns:
        (c,) fp32 per-token loss.
    Example:
        >>> loss = torch.ops.minitron.kd_chunk(s.clone(), t.clone(), None, None, 0, 0.5, 1.0, False)
    """
    if not use_triton and cpu_kernel_applies(s_logits, t_logits, kind):
        loss = cpu_kernel()(s_logits, t_logits, row_scale, temperature)  # gradient over s_logits
        if row_scale is not None and grad is not None:
            grad.copy_(s_logits)  # rounded once to the gradient GEMMs' dtype
        return loss
    fn = triton_chunk_fn() if use_triton else kd_chunk_reference
    if fn is None:
        raise ImportError("impl='triton' needs the triton package (pip install triton)")
    loss, g = fn(s_logits, t_logits, row_scale, kind, beta, temperature, grad_out=grad)
    if g is not None and grad is None and g.data_ptr() != s_logits.data_ptr():
        s_logits.copy_(g)  # reference with vocab padding: its (c, V) work buffer was a new tensor
    return loss


@kd_chunk.register_fake
def _(s_logits, t_logits, row_scale, grad, kind, beta, temperature, use_triton):
    return s_logits.new_empty(s_logits.shape[0])  # (c,) fp32
