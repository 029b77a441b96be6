"""In-place structured gathering of weights: prune rows/columns with ~1x model memory.

``compact_(tensor, dim, index)`` returns ``tensor.index_select(dim, index)`` but builds it
*inside the input's own storage* and then shrinks that storage, so pruning a model never
holds an unpruned and a pruned copy of the same weight at once.

How it works
------------
1. Validate everything (shape, dim, dtype, index dtype/device/range/sortedness) *before*
   touching memory: bad input raises ``ValueError`` and leaves the tensor untouched.
2. Compact in place: the kept rows/columns are moved to the front of the storage as a
   contiguous ``[k, C]`` (``dim=0``) or ``[R, k]`` (``dim=1``) block. Because ``index`` is
   sorted and unique, every element moves *backwards* (destination offset <= source offset),
   so a forward, wave-scheduled copy never overwrites a value that is still to be read
   (see ``csrc/gather_plan.h``). Implemented by the op ``torch.ops.minitron.compact_``, always
   defined (:mod:`minitron.ops.library`): C++/OpenMP on CPU and CUDA kernels on GPU when the
   extension is built, else its chunked pure-PyTorch kernel.
3. Shrink the storage to ``k * C`` (or ``R * k``) elements and return a tensor viewing it.
   The input tensor object is re-pointed to the same compacted storage (``tensor.data =
   out``), so ``compact_(linear.weight, 0, idx)`` updates the parameter in place.

Peak memory per call (``W`` = bytes of the input tensor, ``K`` = bytes kept)
------------------------------------------------------------------------------
* ``cpu-ext``: ``W + min(4 MiB, K)`` staging. The storage is shrunk with ``realloc`` of the
  block owned by c10's default CPU allocator (in place in glibc: ``mremap``/chunk split), so
  no second copy of the kept data is made. If the storage comes from another allocator it
  falls back to ``untyped_storage().resize_()``, which copies: ``W + K`` transiently.
* ``cuda-ext``: ``W + min(32 MiB, K)`` staging for the compaction. The CUDA caching
  allocator cannot shrink a block, so the final ``resize_`` allocates the ``K``-byte block
  and copies into it: transient peak ``W + K`` *for this one tensor* (the tail is freed
  right after). Pruning a model weight by weight therefore peaks at
  ``model + K_max`` where ``K_max`` is the largest kept weight, never ``2 x model``.
* ``torch-fallback``: chunked ``index_select`` in waves of <= 4 MiB (same schedule), then
  ``resize_`` (copies): transient peak ``W + K`` for this tensor.
* ``mapped`` (the input's elements live in a memory-mapped file, e.g. a checkpoint loaded by
  stock ``from_pretrained``: its storage cannot be resized): the kept data is written to a
  fresh private tensor in chunks of ~4 MiB and the source pages each chunk has finished with
  are dropped from the process (:mod:`minitron.ops.mapped`): ``W + 4 MiB``. The input tensor
  is re-pointed at the new tensor; other views of the old storage still read the old values
  (clean file pages are re-read from the page cache; pages written through a private mapping
  are never dropped).
* Copy path (input not eligible for in-place work, see below): ``W + K`` and the input
  is left untouched (a ``CompactFallbackWarning`` says why).

In-place eligibility (otherwise: copy path = plain ``index_select``, input untouched)
------------------------------------------------------------------------------------
The tensor must be contiguous, start at storage offset 0, cover its whole storage (not a
slice of a bigger buffer), not be a view created from another tensor (``tensor._base``),
and have a resizable storage, or be contiguous and memory-mapped from a file (the ``mapped``
path above, taken whatever the storage sharing). Non-contiguous inputs are therefore handled by the copy
path, not by an error. Other tensors created with ``.data``/``.detach()`` on the same
storage (e.g. the ``nn.Parameter`` when you pass ``param.data``) can not be detected:
they see the shrunk storage, so re-assign them (``param.data = out``).

Backends
--------
``gather_backend(device)`` reports ``"cpu-ext"``, ``"cuda-ext"`` or ``"torch-fallback"``.
Set ``MINITRON_GATHER_BACKEND=torch`` (or pass ``backend="torch"``) to force the fallback.
See :mod:`minitron.ops._loader` for how the extension is found/built.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch

from . import _loader, mapped
from .library import compact_reference_

__all__ = ["compact_", "gather_backend", "CompactFallbackWarning", "SUPPORTED_DTYPES"]

#: dtypes compact_ accepts (bit copies: any 1/2/4/8-byte type works in the kernels).
SUPPORTED_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
)


class CompactFallbackWarning(UserWarning):
    """compact_ could not work in place and copied instead (memory peak = input + kept)."""


def gather_backend(device: Union[str, torch.device, int, None] = "cpu") -> str:
    """Which implementation :func:`compact_` uses for tensors on ``device``.

    The first call may build the extension (JIT, ~1 min) if it was not prebuilt.

    Args:
        device: a ``torch.device``, device string (``"cpu"``, ``"cuda:0"``) or CUDA ordinal.

    Returns:
        ``"cuda-ext"`` / ``"cpu-ext"`` when the C++/CUDA kernel for that device type is loaded,
        otherwise ``"torch-fallback"`` (also when ``MINITRON_GATHER_BACKEND=torch``).

    Example:
        >>> gather_backend("cpu") in {"cpu-ext", "torch-fallback"}
        True
    """
    if device is None:
        device = "cpu"
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if _loader.forced_torch_fallback():
        return "torch-fallback"
    if dev.type in ("cpu", "cuda") and _loader.has_kernel(dev.type):
        return f"{dev.type}-ext"
    return "torch-fallback"


def _validate(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Check all inputs without mutating anything; return (normalised dim, int64 index)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"compact_: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() not in (1, 2):
        raise ValueError(
            f"compact_: tensor must be 1-D or 2-D, got shape {tuple(tensor.shape)}; "
            "reshape it to 2-D (e.g. w.view(w.shape[0], -1)) first"
        )
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"compact_: dim must be an int, got {dim!r}")
    nd = tensor.dim()
    if not -nd <= dim < nd:
        valid = "0 (rows) or 1 (columns)" if nd == 2 else "0 (the only dim of a 1-D tensor)"
        raise ValueError(f"compact_: dim={dim} is out of range for a {nd}-D tensor; use {valid}")
    dim = dim % nd
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"compact_: unsupported dtype {tensor.dtype}; supported: "
            f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)} "
            "(cast with tensor.to(torch.float32) first)"
        )
    if not isinstance(index, torch.Tensor):
        raise ValueError(
            f"compact_: index must be a torch.Tensor (int64), got {type(index).__name__}; "
            "use torch.as_tensor(index, dtype=torch.long)"
        )
    if index.dim() != 1:
        raise ValueError(f"compact_: index must be 1-D, got shape {tuple(index.shape)}; use index.flatten()")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"compact_: index must be an integer (int64) tensor, got {index.dtype}; use index.long()")
    if index.device != tensor.device:
        raise ValueError(
            f"compact_: index is on {index.device} but tensor is on {tensor.device}; "
            "pass index.to(tensor.device)"
        )
    index = index.long()
    size = tensor.shape[dim]
    if index.numel() > 0 and tensor.device.type != "meta":
        lo, hi = int(index.min()), int(index.max())  # one sync each on CUDA (cheap)
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"compact_: index value {bad} is out of range for dim {dim} of size {size}; "
                f"indices must be in [0, {size})"
            )
        if index.numel() > 1:
            step = index[1:] - index[:-1]
            if bool((step == 0).any()):
                raise ValueError("compact_: index has duplicate entries; use torch.unique(index) (sorted, unique)")
            if bool((step < 0).any()):
                raise ValueError(
                    "compact_: index must be sorted ascending; use index.sort().values or torch.unique(index)"
                )
    return dim, index


def _inplace_blocker(tensor: torch.Tensor) -> Optional[str]:
    """Reason why ``tensor`` can not be compacted in place (None if it can)."""
    if not tensor.is_contiguous():
        return "tensor is not contiguous"
    if tensor._base is not None:
        return "tensor is a view of another tensor (its storage is shared)"
    if tensor.device.type == "meta":
        return "tensor is on the meta device"
    st = tensor.untyped_storage()
    if tensor.storage_offset() != 0 or st.nbytes() != tensor.numel() * tensor.element_size():
        return "tensor covers only part of its storage (shared with other views)"
    if not st.resizable():
        return "tensor's storage is not resizable (e.g. from_blob / numpy / mmap)"
    return None


@torch.compiler.disable
def compact_(
    tensor: torch.Tensor,
    dim: int,
    index: torch.Tensor,
    *,
    backend: Optional[str] = None,
    _stage_bytes: int = -1,
) -> torch.Tensor:
    """Keep only ``index`` along ``dim`` of ``tensor``, in place, and shrink its storage.

    Equivalent to ``tensor.index_select(dim, index)`` but without a second full copy: the
    kept rows/columns are packed to the front of the input's storage, the storage is shrunk
    to the kept size, and the input tensor object is re-pointed at it. The input's old
    contents are consumed. Runs eagerly under ``torch.compile`` (storage resizing cannot be
    traced); the underlying op ``torch.ops.minitron.compact_`` is traceable.

    Args:
        tensor: 2-D ``[R, C]`` weight, or 1-D ``[N]`` (norm weight / bias) with ``dim=0``.
            dtype in :data:`SUPPORTED_DTYPES` (fp32/fp16/bf16/...). Any ``requires_grad``
            is ignored (pruning is not differentiable).
        dim: dimension to prune (``0``/``-2`` rows, ``1``/``-1`` columns).
        index: sorted, unique, in-range integer (int64) 1-D tensor on ``tensor.device``.
        backend: ``None``/``"auto"`` (default, see :func:`gather_backend`), ``"torch"`` to
            force the pure-PyTorch fallback.
        _stage_bytes: staging/chunk budget override (testing only).

    Returns:
        A tensor equal to ``tensor.index_select(dim, index)`` (``shape[dim] == len(index)``)
        whose storage holds only the kept elements. A contiguous memory-mapped input (stock
        ``from_pretrained`` checkpoint) gets a private kept copy while its file pages are
        released chunk by chunk, and is re-pointed at it. Otherwise, if in-place work is
        impossible (non-contiguous, shared or non-resizable storage) a
        ``CompactFallbackWarning`` is issued and a plain ``index_select`` copy is returned,
        leaving ``tensor`` untouched.

    Raises:
        ValueError: bad dim, dtype, index dtype/shape/device, out-of-range, duplicate or
            unsorted indices. The tensor is not modified.

    Example:
        >>> w = torch.randn(6, 4)
        >>> ref = w.index_select(0, torch.tensor([1, 4]))
        >>> out = compact_(w, 0, torch.tensor([1, 4]))
        >>> torch.equal(out, ref), out.untyped_storage().nbytes()
        (True, 32)
    """
    dim, index = _validate(tensor, dim, index)
    blocker = _inplace_blocker(tensor)
    if blocker is not None and tensor.is_contiguous() and mapped.file_mapping(tensor) is not None:
        # memory-mapped checkpoint (stock from_pretrained): private kept copy, source pages dropped
        # chunk by chunk; the old storage stays readable (clean file pages re-read on access)
        out = mapped.gather_release(tensor, dim, index, **({"chunk_bytes": _stage_bytes} if _stage_bytes > 0 else {}))
        tensor.data = out
        return out
    if blocker is not None:
        warnings.warn(
            f"compact_: {blocker}; falling back to a copy (index_select), input left untouched. "
            "Peak memory is input + kept size.",
            CompactFallbackWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            return tensor.index_select(dim, index)

    if backend in (None, "auto", "ext"):
        use_ext = gather_backend(tensor.device) != "torch-fallback"
    elif backend in ("torch", "torch-fallback"):
        use_ext = False
    else:
        raise ValueError(f"compact_: backend must be None, 'auto' or 'torch', got {backend!r}")

    k = index.numel()
    if tensor.dim() == 1:
        out_shape: tuple[int, ...] = (k,)
    else:
        R, C = tensor.shape
        out_shape = (k, C) if dim == 0 else (R, k)
    es = tensor.element_size()
    new_nbytes = math.prod(out_shape) * es

    with torch.no_grad():
        t = tensor.detach()  # same storage; no autograd bookkeeping for the mutation
        # 1-D [N] is the column case of a [1, N] matrix (faster element gather than N 1-elem rows)
        w2d, d2 = (t.view(1, -1), 1) if t.dim() == 1 else (t, dim)
        if use_ext:  # the C++/CUDA kernel of the op
            torch.ops.minitron.compact_(w2d, d2, index, _stage_bytes)
        else:  # its pure-PyTorch kernel, also when the extension is loaded but backend="torch" is forced
            compact_reference_(w2d, d2, index, _stage_bytes)
        del w2d

        storage = t.untyped_storage()
        shrunk = False
        if use_ext and t.device.type == "cpu":
            shrunk = bool(_loader.load_extension().shrink_storage_cpu_(t, new_nbytes))
        if not shrunk:
            storage.resize_(new_nbytes)  # copies the kept bytes into a right-sized block
        out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        out.set_(storage, 0, out_shape)
        del t
    # Re-point the caller's tensor (e.g. an nn.Parameter) at the compacted storage so it
    # never has sizes larger than its storage.
    try:
        tensor.data = out
    except RuntimeError:  # pragma: no cover - exotic tensor subclasses
        pass
    return out
