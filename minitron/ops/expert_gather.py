"""Structured gathers of the fused 3-D expert tensors of mixture-of-experts layers.

transformers stores a sparse layer's experts as ``gate_up_proj`` (E, 2F, D) and ``down_proj``
(E, D, F). Pruning gathers along three kinds of axes, one step at a time (``dim``, ``index``):

- ``index`` 1-D on any dim: the same indices for every expert (kept experts on dim 0, kept hidden
  channels on the D dim);
- ``index`` 2-D (E, k) on dim 1 or 2: each expert keeps its own indices (its own FFN neurons),
  row ``e`` of ``index`` for expert ``e`` of the (already expert-pruned) tensor.

:func:`select_experts` is the copy (``index_select`` / ``gather``). :func:`compact_experts_` works
like :func:`minitron.ops.gather.compact_`: the tensor's storage is viewed as a 2-D matrix in which
the step is one sorted row or column selection (e.g. the kept experts' kept rows of (E * 2F, D)),
which ``compact_`` packs in place (or, for a memory-mapped checkpoint, copies out while dropping
the file pages). The one step that is not a 2-D selection, per-expert columns of ``down_proj``, is
packed expert by expert in chunks of whole rows: every element moves backwards in the flat
storage (destination offset <= source offset) and each chunk is gathered into a small temporary
before it is written, so no value is overwritten before it is read. Peak: the tensor plus ~4 MiB.
"""

from __future__ import annotations

import torch

from . import _loader, mapped
from .gather import _inplace_blocker, compact_, gather_backend

__all__ = ["compact_experts_", "compact_any_", "select_any", "select_experts"]

_CHUNK_BYTES = 4 << 20


def _check(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
    if tensor.dim() != 3:
        raise ValueError(f"expert tensors are 3-D (E, rows, cols), got shape {tuple(tensor.shape)}")
    if index.dim() == 2:
        if dim not in (1, 2):
            raise ValueError(f"per-expert indices (E, k) apply to dim 1 or 2, got dim={dim}")
        if index.shape[0] != tensor.shape[0]:
            raise ValueError(f"per-expert indices have {index.shape[0]} rows for {tensor.shape[0]} experts; "
                             "prune the experts (dim 0) first")
    elif index.dim() != 1:
        raise ValueError(f"index must be 1-D or (E, k), got shape {tuple(index.shape)}")


def select_experts(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """A new tensor with ``index`` kept along ``dim`` of the 3-D ``tensor`` (per expert for a 2-D index).

    Args:
        tensor: (E, A, B) expert weights.
        dim: 0, 1 or 2.
        index: sorted keep-indices, (k,) or per expert (E, k).
    Returns:
        The gathered tensor (input untouched).
    Example:
        >>> select_experts(torch.arange(8.).view(2, 2, 2), 2, torch.tensor([[0], [1]])).flatten()
        tensor([0., 2., 5., 7.])
    """
    _check(tensor, dim, index)
    index = index.to(tensor.device)
    if index.dim() == 1:
        return tensor.index_select(dim, index)
    E, A, B = tensor.shape
    if dim == 1:
        return torch.gather(tensor, 1, index[:, :, None].expand(E, index.shape[1], B))
    return torch.gather(tensor, 2, index[:, None, :].expand(E, A, index.shape[1]))


def _as_2d(tensor: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A 2-D tensor over ``tensor``'s storage with no ``_base`` (so ``compact_`` may shrink the storage)."""
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return out.set_(tensor.untyped_storage(), tensor.storage_offset(), (rows, cols))


def _grouped_columns_(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[e] = tensor[e][:, index[e]]`` packed inside ``tensor``'s own storage, then the storage shrunk."""
    E, R, C = tensor.shape
    k = index.shape[1]
    flat = _as_2d(tensor, 1, E * R * C)[0]
    rows = max(1, _CHUNK_BYTES // max(C * tensor.element_size(), 1))
    for e in range(E):
        src = tensor[e]  # (R, C); its flat offset e*R*C >= every destination written so far
        for r0 in range(0, R, rows):
            r1 = min(R, r0 + rows)
            chunk = src[r0:r1].index_select(1, index[e])  # read before writing: overlap-safe
            dst = (e * R + r0) * k
            flat[dst : dst + chunk.numel()].copy_(chunk.view(-1))
    storage, nbytes = tensor.untyped_storage(), E * R * k * tensor.element_size()
    shrunk = tensor.device.type == "cpu" and gather_backend("cpu") == "cpu-ext" and \
        bool(_loader.load_extension().shrink_storage_cpu_(flat, nbytes))  # realloc in place, no copy
    if not shrunk:
        storage.resize_(nbytes)
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return out.set_(storage, 0, (E, R, k))


@torch.no_grad()
def compact_experts_(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """:func:`select_experts` built inside ``tensor``'s storage (or, memory-mapped, a private copy).

    Args:
        tensor: (E, A, B) contiguous expert weights (a parameter's ``.data``).
        dim: 0, 1 or 2.
        index: sorted keep-indices, (k,) or per expert (E, k).
    Returns:
        The gathered (E', A', B') tensor; ``tensor`` itself must not be used afterwards (its storage
        may have been shrunk): re-point the parameter (``param.data = out``). A non-contiguous input is
        copied (:func:`select_experts`) and left untouched.
    Example:
        >>> w = experts.down_proj
        >>> w.data = compact_experts_(w.data, 0, torch.tensor([0, 3]))  # keep experts 0 and 3
    """
    _check(tensor, dim, index)
    if not tensor.is_contiguous():
        return select_experts(tensor, dim, index)
    index = index.to(tensor.device).long()
    E, A, B = tensor.shape
    if dim == 2 and index.dim() == 2:  # per-expert columns: no 2-D view makes them one selection
        if _inplace_blocker(_as_2d(tensor, E * A, B)) is None:
            return _grouped_columns_(tensor, index)
        out = select_experts(tensor, dim, index)
        mapped.release_pages_(tensor)  # a mapped checkpoint: drop the pages just read
        return out
    if dim == 0:
        view, d, sel = _as_2d(tensor, E, A * B), 0, index
    elif dim == 2:
        view, d, sel = _as_2d(tensor, E * A, B), 1, index
    else:  # dim 1: rows of each expert -> one sorted selection of the (E * A, B) rows
        per_expert = index if index.dim() == 2 else index.expand(E, -1)
        sel = (torch.arange(E, device=index.device)[:, None] * A + per_expert).flatten()
        view, d = _as_2d(tensor, E * A, B), 0
    out2d = compact_(view, d, sel)
    shape = (sel.numel(), A, B) if dim == 0 else (E, A, sel.numel()) if dim == 2 else (E, sel.numel() // E, B)
    out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return out.set_(out2d.untyped_storage(), out2d.storage_offset(), shape)


def select_any(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``index_select`` for 1-D/2-D weights, :func:`select_experts` for 3-D expert tensors (a copy)."""
    if tensor.dim() == 3:
        return select_experts(tensor, dim, index)
    return tensor.index_select(dim, index.to(tensor.device))


def compact_any_(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """:func:`~minitron.ops.gather.compact_` for 1-D/2-D weights, :func:`compact_experts_` for 3-D ones."""
    if tensor.dim() == 3:
        return compact_experts_(tensor, dim, index)
    return compact_(tensor, dim, index.to(tensor.device))
