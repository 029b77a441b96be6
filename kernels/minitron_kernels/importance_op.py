"""``torch.ops.minitron.importance_accumulate_`` / ``block_cos_sum_``: the importance reductions as torch.library ops.

The third file of the op's home, beside its Triton launcher (:mod:`minitron_kernels.importance`) and its
pure-PyTorch reference (:mod:`minitron_kernels.importance_reference`). Each op is one registered entry
point with two kernels, and the caller chooses which with ``use_triton`` (``minitron.dispatch.Dispatch``
makes that choice in :mod:`minitron.importance.aggregate`, which also reports it):

* ``use_triton=False``: the reference, the code that runs on CPU (``.register_kernel("cpu")``) and on
  CUDA when ``impl="reference"``;
* ``use_triton=True``: the Triton launcher, whose kernels are launched through
  ``torch.library.wrap_triton(kernel)[grid](...)``: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``.

How ``torch.compile`` sees them: where triton imports, the ops are ``torch.library.triton_op``s, so
AOTAutograd decomposes a call into the op's body. With ``use_triton=True`` that body is the
``wrap_triton`` launches, which inductor inlines as user-defined Triton kernels (it can fuse and
schedule around them, no graph break); with ``use_triton=False`` it is the reference's torch ops,
which inductor compiles like any other (C++ on CPU). Without triton (a CPU-only install) they are plain
``torch.library.custom_op``s with the same schema, body and fake kernel: ``torch.compile`` then keeps
one opaque node per call (still no graph break); ``use_triton=True`` raises ImportError.

Shapes: ``sum_x``, ``sum_x2``: fp32 (D,) contiguous running sums; ``act``: (B, S, D) or (S, D) any float
dtype; ``sum_cos``: fp32 (1,); ``h_in``, ``h_out``: (..., D) of one shape. Both ops mutate their
accumulators in place and return nothing.
"""

from __future__ import annotations

import os

import torch

from .importance_reference import accumulate_reference, block_importance_reference

try:  # triton is optional: the Triton launchers exist only where it imports
    from .importance import accumulate_triton, block_cos_sum_triton
except ImportError:
    accumulate_triton = block_cos_sum_triton = None

__all__ = ["HAVE_TRITON", "importance_accumulate_", "block_cos_sum_"]

HAVE_TRITON = accumulate_triton is not None
_register = torch.library.triton_op if HAVE_TRITON else torch.library.custom_op


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(device: torch.device | None) -> None:
    """One clear error when the Triton path is asked for where it cannot run (``device=None``: any device)."""
    if not HAVE_TRITON:
        raise ImportError("use_triton=True needs the triton package (pip install triton), or use_triton=False")
    if device is not None and device.type == "cpu" and not _interpreter_on():
        raise ValueError("use_triton=True on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported; "
                         "use use_triton=False (the reference) on CPU")


@_register("minitron::importance_accumulate_", mutates_args=("sum_x", "sum_x2"))
def importance_accumulate_(sum_x: torch.Tensor, sum_x2: torch.Tensor, act: torch.Tensor, seq_agg: str,
                           use_triton: bool) -> None:
    """In place ``sum_x += sum_b x_b``, ``sum_x2 += sum_b x_b^2`` (``x_b``: per-sample sequence aggregate).

    Args:
        sum_x: fp32 (D,) running sum of the per-sample aggregates.
        sum_x2: fp32 (D,) running sum of their squares.
        act: (B, S, D) or (S, D) activation, any float dtype.
        seq_agg: ``"mean"`` | ``"l2"`` | ``"var"``.
        use_triton: run the Triton kernels (wrap_triton launches) instead of the reference.
    Returns:
        None (the accumulators are updated in place).
    Example:
        >>> sx, sx2 = torch.zeros(8), torch.zeros(8)
        >>> torch.ops.minitron.importance_accumulate_(sx, sx2, torch.ones(2, 3, 8), "mean", False)
        >>> sx[0].item(), sx2[0].item()
        (2.0, 2.0)
    """
    if use_triton:
        _check_triton(None)
        accumulate_triton(sum_x, sum_x2, act, seq_agg)
    else:
        accumulate_reference(sum_x, sum_x2, act, seq_agg)


@_register("minitron::block_cos_sum_", mutates_args=("sum_cos",))
def block_cos_sum_(sum_cos: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor, use_triton: bool) -> None:
    """In place ``sum_cos += sum over rows of cos(h_in[row], h_out[row])`` (Block Importance numerator).

    Args:
        sum_cos: fp32 (1,) running sum.
        h_in, h_out: (..., D) decoder-layer input and output, any float dtype, same shape.
        use_triton: run the Triton kernel (a wrap_triton launch) instead of the reference.
    Returns:
        None (``sum_cos`` is updated in place).
    Example:
        >>> acc, h = torch.zeros(1), torch.randn(2, 5, 8)
        >>> torch.ops.minitron.block_cos_sum_(acc, h, 2 * h, False); round(acc.item(), 4)
        10.0
    """
    if use_triton:
        _check_triton(None)
        block_cos_sum_triton(sum_cos, h_in, h_out)
    else:
        block_importance_reference(sum_cos, h_in, h_out)


# Fake kernels: the ops only update their inputs in place. (triton_op's default fake kernel is its body;
# a no-op spares tracing a reference pass, and custom_op has none.)
importance_accumulate_.register_fake(lambda sum_x, sum_x2, act, seq_agg, use_triton: None)
block_cos_sum_.register_fake(lambda sum_cos, h_in, h_out, use_triton: None)


@importance_accumulate_.register_kernel("cpu")
def _accumulate_cpu(sum_x, sum_x2, act, seq_agg, use_triton):
    """CPU: the reference; the Triton launcher only under the Triton interpreter."""
    if use_triton:
        _check_triton(act.device)
        accumulate_triton(sum_x, sum_x2, act, seq_agg)
    else:
        accumulate_reference(sum_x, sum_x2, act, seq_agg)


@block_cos_sum_.register_kernel("cpu")
def _block_cos_cpu(sum_cos, h_in, h_out, use_triton):
    """CPU: the reference; the Triton launcher only under the Triton interpreter."""
    if use_triton:
        _check_triton(h_in.device)
        block_cos_sum_triton(sum_cos, h_in, h_out)
    else:
        block_importance_reference(sum_cos, h_in, h_out)
