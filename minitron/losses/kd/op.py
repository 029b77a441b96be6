"""``torch.ops.minitron.kd_chunk``: the KD chunk op, registered with torch.library, and which kernel runs it.

One registered op with three kernels, chosen by ``use_triton`` and the device:

* the Triton kernel :func:`minitron_kernels.fused_kl.kd_chunk_triton` (``use_triton=True``: CUDA, or the CPU
  under ``TRITON_INTERPRET=1``), which launches its kernel through ``torch.library.wrap_triton``;
* the pure-PyTorch :func:`minitron.losses.kd.reference.kd_chunk_reference` (``impl="chunked"``), except
  that forward KL on CPU runs the fused C++ kernel of :mod:`minitron.losses.kd.cpu_kernel` (same contract,
  tested against the reference) where it is built and the CPU has AVX-512 (the ``register_kernel("cpu")``
  kernel).

How ``torch.compile`` sees it: where triton imports, the op is a ``torch.library.triton_op``, and AOTAutograd
decomposes a ``use_triton=True`` call into the Triton launch (inductor inlines the kernel: no opaque node,
no graph break). Every other call stays one opaque node that runs the same kernel as eager: the fused C++
kernel is a pybind function, not traceable, and the reference keeps its reused CPU workspace; so a compiled
CPU run computes bit for bit what eager does. Without triton (CPU-only installs, which import this module
unchanged) it is a ``torch.library.custom_op`` with the same schema and kernels. The fake kernel only
allocates the (c,) loss.

Contract (both kernels): the chunk's fp32 logits ``s_logits`` (c, Vs) / ``t_logits`` (c, Vt) are
overwritten; with a ``row_scale`` the gradient w.r.t. the student logits is written into ``grad``
(any float dtype, rounded once) or, when ``grad`` is None, over ``s_logits``; returns the per-token
loss (c,) fp32. Custom ops may not return an alias of an input, hence "written into", not returned.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from minitron.losses.kd.cpu_kernel import cpu_kernel, cpu_kernel_applies
from minitron.losses.kd.reference import kd_chunk_reference

try:  # triton is optional: the Triton launcher exists only where it imports
    from minitron_kernels.fused_kl import kd_chunk_triton
except ImportError:
    kd_chunk_triton = None

__all__ = ["kd_chunk", "triton_chunk_fn"]

_register = torch.library.triton_op if kd_chunk_triton is not None else torch.library.custom_op


def triton_chunk_fn():
    """The Triton chunk launcher, or None when triton is not installed."""
    return kd_chunk_triton


def _finish(loss, g, s_logits, grad, use_triton):
    """Without a ``grad`` buffer the gradient belongs over ``s_logits``: the Triton kernel always writes it
    there; the reference may leave it in one of its work buffers (vocab padding, reverse KL, JSD), copied
    back here. ``use_triton`` is tested first: the Triton path is what torch.compile traces, and a traced
    tensor has no ``data_ptr``."""
    if g is not None and grad is None and not use_triton and g.data_ptr() != s_logits.data_ptr():
        s_logits.copy_(g)
    return loss


def _kd_chunk_body(s_logits: torch.Tensor, t_logits: torch.Tensor, row_scale: Optional[torch.Tensor],
             grad: Optional[torch.Tensor], kind: int, beta: float, temperature: float,
             use_triton: bool) -> torch.Tensor:
    """Per-token KD loss (c,) of one chunk; the student-logits gradient lands in ``grad`` or ``s_logits``.

    The body is what runs off CPU (the Triton launcher, whose kernel is launched through ``wrap_triton``,
    or the reference) and what ``torch.compile`` inlines for ``use_triton=True``; the CPU kernel
    (:func:`_kd_chunk_cpu`) adds the fused C++ kernel.

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
    if use_triton:
        if kd_chunk_triton is None:
            raise ImportError("impl='triton' needs the triton package (pip install triton)")
        loss, g = kd_chunk_triton(s_logits, t_logits, row_scale, kind, beta, temperature, grad_out=grad)
    else:
        loss, g = kd_chunk_reference(s_logits, t_logits, row_scale, kind, beta, temperature, grad_out=grad)
    return _finish(loss, g, s_logits, grad, use_triton)


kd_chunk = _register("minitron::kd_chunk", mutates_args=("s_logits", "t_logits", "grad"))(_kd_chunk_body)


@kd_chunk.register_kernel("cpu")
def _kd_chunk_cpu(s_logits, t_logits, row_scale, grad, kind, beta, temperature, use_triton):
    """CPU: the fused C++ kernel for forward KL where it is built and applies, else the body (the
    reference; the Triton launcher under ``TRITON_INTERPRET=1``)."""
    if not use_triton and cpu_kernel_applies(s_logits, t_logits, kind):
        loss = cpu_kernel()(s_logits, t_logits, row_scale, temperature)  # gradient over s_logits
        if row_scale is not None and grad is not None:
            grad.copy_(s_logits)  # rounded once to the gradient GEMMs' dtype
        return loss
    return _kd_chunk_body(s_logits, t_logits, row_scale, grad, kind, beta, temperature, use_triton)


@kd_chunk.register_fake  # replaces triton_op's default (its body): shapes need no reference pass
def _(s_logits, t_logits, row_scale, grad, kind, beta, temperature, use_triton):
    return s_logits.new_empty(s_logits.shape[0])  # (c,) fp32


if kd_chunk_triton is not None:  # triton_op: compile inlines the Triton launch, other paths stay one opaque node
    def _decompose_triton_only(mode, op, types, args, kwargs):
        """AOTAutograd's functionalization: decompose the call into the body (the wrap_triton launch)
        only for ``use_triton=True``; the reference and the CPU kernels (the fused C++ kernel is not
        traceable) stay the registered op, so a compiled CPU run computes what eager computes."""
        if not _SIGNATURE.bind(*args, **kwargs).arguments["use_triton"]:
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode:
            return _kd_chunk_body(*args, **kwargs)

    _SIGNATURE = inspect.signature(_kd_chunk_body)
    kd_chunk.register_torch_dispatch(FunctionalTensorMode, _decompose_triton_only)
