"""The ``torch.ops.minitron`` library: schemas, fake kernels and pure-PyTorch kernels, defined at import.

``minitron::compact_(Tensor(a!) self, int dim, Tensor index, int stage_bytes=-1) -> ()`` packs the
rows (``dim=0``) or columns (``dim=1``) ``index`` of a contiguous 2-D tensor to the front of its
own memory (see :mod:`minitron.ops.gather`, which also shrinks the storage). It exists whether or
not the C++/CUDA extension ``minitron._C`` is built:

* schema and fake (meta) kernel: here, so the op traces under ``torch.compile`` / ``opcheck``;
* :func:`compact_reference_`: the chunked pure-PyTorch kernel, registered for
  ``CompositeExplicitAutograd`` (every device without a kernel of its own);
* the extension (``csrc/``, loaded by :mod:`minitron.ops._loader`) only adds CPU and CUDA kernels
  (``TORCH_LIBRARY_IMPL``), which the dispatcher then prefers.
"""

from __future__ import annotations

import torch

__all__ = ["COMPACT", "DEFAULT_STAGE_BYTES", "compact_reference_"]

COMPACT = "minitron::compact_"
DEFAULT_STAGE_BYTES = 4 << 20  # staging chunk of the pure-PyTorch kernel (the C++ kernels have their own)

_LIB = torch.library.Library("minitron", "DEF")  # kept alive for the process: dropping it unregisters
_LIB.define("compact_(Tensor(a!) self, int dim, Tensor index, int stage_bytes=-1) -> ()")


@torch.library.register_fake(COMPACT, lib=_LIB)
def _compact_fake(self: torch.Tensor, dim: int, index: torch.Tensor, stage_bytes: int = -1) -> None:
    # shape-only checks: the op mutates `self` in place and returns nothing
    torch._check(self.dim() == 2, lambda: "minitron::compact_: expected a 2-D tensor")
    torch._check(dim in (0, 1), lambda: "minitron::compact_: dim must be 0 or 1")
    torch._check(index.dim() == 1, lambda: "minitron::compact_: index must be 1-D")
    return None


def compact_reference_(w: torch.Tensor, dim: int, index: torch.Tensor, stage_bytes: int = -1) -> None:
    """Pure-PyTorch in-place compaction of a contiguous 2-D ``w`` (the C++ kernels' wave idea, chunked).

    Writes the contiguous ``w.index_select(dim, index)`` to the front of ``w``'s memory using
    temporaries of at most ~``stage_bytes`` (``<= 0``: :data:`DEFAULT_STAGE_BYTES`). ``index`` must be
    sorted and unique (checked by :func:`minitron.ops.gather.compact_`): then destination offsets never
    exceed source offsets and each chunk's sources are read (into the temporary) before writing.
    """
    torch._check(w.dim() == 2 and w.is_contiguous(), lambda: "minitron::compact_: expected a contiguous 2-D tensor")
    torch._check(dim in (0, 1), lambda: "minitron::compact_: dim must be 0 or 1")
    stage_bytes = stage_bytes if stage_bytes > 0 else DEFAULT_STAGE_BYTES
    R, C = w.shape
    k = index.numel()
    es = w.element_size()
    ar = torch.arange(k, device=index.device)
    moved = (index != ar).nonzero()
    if moved.numel() == 0 and (dim == 0 or k == C):
        return  # identity: everything already in place
    if dim == 0:
        start = int(moved[0]) if moved.numel() else k
        rows = max(1, stage_bytes // max(1, C * es))
        for i in range(start, k, rows):
            j = min(k, i + rows)
            # temp [j-i, C]; writes rows [i, j) which no later chunk reads (index[m] >= m >= j)
            w[i:j] = w.index_select(0, index[i:j])
    else:
        flat = w.view(-1)
        rows = max(1, stage_bytes // max(1, k * es))
        for a in range(0, R, rows):
            b = min(R, a + rows)
            tmp = w[a:b].index_select(1, index)  # [b-a, k]
            # writes flat[a*k : b*k]; later rows are read from >= b*C >= b*k
            flat[a * k : b * k].copy_(tmp.view(-1))


_LIB.impl("compact_", compact_reference_, "CompositeExplicitAutograd")
