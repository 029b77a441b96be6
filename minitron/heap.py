"""Hand the C heap's free memory back to the operating system between the phases of a prune.

On glibc, tensors under ~32 MiB come from the ``malloc`` heap once a few larger ones have been
freed (the dynamic mmap threshold rises to the largest freed block, up to 32 MiB). Memory freed
there stays resident: up to twice that threshold at the top of the heap, plus every freed hole
in between, until something calls ``malloc_trim``. Calibration frees ~100 MiB of activations on
SmolLM2-135M, so without a trim the candidate-shape scoring and the pruning step that follow
start on top of that garbage: the whole ``prune(..., inplace=True)`` call peaked 1.10-1.16x
the model's bytes where its live memory peaks at 1.06x.

:func:`trim_heap` calls glibc's ``malloc_trim(0)`` (free pages are ``madvise``-d away; nothing
that is allocated moves or changes). It is a no-op returning ``False`` where glibc is absent
(macOS, Windows, musl). :func:`trimmed_layers` calls it before every decoder layer's forward,
which bounds what one pass leaves resident to about one layer's freed activations.
:func:`released_chunks` walks a tensor in slices and drops a memory-mapped tensor's file pages
behind it, so a full read (a NaN/inf scan) does not leave the whole checkpoint file resident.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["released_chunks", "trim_heap", "trimmed_layers"]

_TRIM: list = []  # [malloc_trim function or None], resolved on first use


def _malloc_trim():
    if not _TRIM:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim  # glibc only (musl has no malloc_trim)
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _TRIM.append(fn)
    return _TRIM[0]


def trim_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``).

    Cost: a walk over the heap's free chunks (about a millisecond after a calibration batch);
    pages are faulted back in if later allocations reuse them.

    Returns:
        ``True`` if glibc released memory, ``False`` if there was nothing to release or the C
        library has no ``malloc_trim`` (then nothing is done).
    Example:
        >>> trim_heap()  # after a pass whose activations are gone
        True
    """
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


@contextmanager
def trimmed_layers(layers) -> Iterator[None]:
    """Inside the ``with`` block, :func:`trim_heap` runs before each of ``layers``' forwards.

    The hooks return nothing (inputs and outputs are untouched) and are removed on exit. On
    SmolLM2-135M an evaluation pass kept ~30 MiB resident above the model with them and ~45-85
    MiB without (live tensors: ~20 MiB), at no measurable cost in time.

    Args:
        layers: the decoder layers (``nn.Module`` s).
    Example:
        >>> with trimmed_layers(model.model.layers):
        ...     scores = collect_importance(model, blocks)
    """
    if _malloc_trim() is None:
        yield
        return

    def hook(module: nn.Module, args) -> None:
        trim_heap()

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def released_chunks(t: torch.Tensor, chunk: int = 1 << 20) -> Iterator[torch.Tensor]:
    """The flat ``chunk``-element slices of ``t``, each slice's file pages dropped once the caller moves on.

    For a weight memory-mapped from a safetensors file (stock ``from_pretrained``) the pages a slice
    faulted in are clean, so dropping them loses nothing (a later read faults them back in from the page
    cache); for any other tensor the slices are plain views.

    Args:
        t: the tensor to walk (contiguous or not; it is read through ``reshape(-1)``).
        chunk: elements per slice (1M: a few MiB, next to the ``abs()`` copy and bool masks a check builds).
    Returns:
        An iterator of 1-D views.
    Example:
        >>> all(bool(torch.isfinite(part).all()) for part in released_chunks(weight))
        True
    """
    from .ops.mapped import page_releaser

    flat = t.reshape(-1)
    release = page_releaser(t)
    for i in range(0, flat.numel(), chunk):
        part = flat[i : i + chunk]
        yield part
        if release is not None:
            release(part)
