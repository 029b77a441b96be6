"""Reused scratch buffers of the KD loss: the chunk's (c, V) logits, gradient and softmax temporaries.

On CPU a fresh buffer of (c, V) fp32 is an mmap that glibc returns on free, so every chunk of every
step faults its pages in again (~0.64M minor faults per step at N=2048, V=49152, measured in issue
27: each chunk op temporary and logits buffer once). Reusing one buffer per name across chunks, and
across calls from the same thread, makes that once per process; :func:`release_workspace` hands the
memory back (about 5 (c, V) fp32 buffers plus one fp32 copy of each bf16 lm_head).
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["Workspace", "release_workspace", "workspace_for"]
_LOCAL = threading.local()


class Workspace:
    """Named scratch buffers, each grown to the largest size asked for and then handed out as views.

    Example:
        >>> ws = Workspace()
        >>> a = ws.get("s_logits", (4, 10), torch.float32, torch.device("cpu"))
        >>> ws.get("s_logits", (2, 10), torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
        True
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` view of buffer ``name`` (uninitialised; reused, never shared between names)."""
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            self._bufs.pop(key, None)  # free the smaller one first
            buf = self._bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


def workspace_for(t: torch.Tensor) -> Workspace:
    """This thread's persistent CPU workspace for eager CPU tensors, else a fresh one (one call's lifetime).

    CUDA needs no persistence (its caching allocator reuses memory); traced / fake tensors must never be
    kept past the call.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling() or type(t) not in (torch.Tensor, torch.nn.Parameter):
        return Workspace()
    ws = getattr(_LOCAL, "ws", None)
    if ws is None:
        ws = _LOCAL.ws = Workspace()
    return ws


def release_workspace() -> int:
    """Free this thread's KD-loss CPU workspace (it is rebuilt on the next call).

    Returns:
        The number of bytes released.
    Example:
        >>> release_workspace() >= 0
        True
    """
    ws = getattr(_LOCAL, "ws", None)
    _LOCAL.ws = None
    return 0 if ws is None else ws.nbytes()
