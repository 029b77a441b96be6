"""Weights that live in a memory-mapped file: find their mapping, gather from them, release their pages.

Stock ``from_pretrained`` memory-maps safetensors checkpoints: every weight is a view of the
file's pages (``/proc/self/maps`` shows a ``rw-p`` mapping of ``model.safetensors``), its storage
cannot be resized, so :func:`minitron.ops.gather.compact_` cannot shrink it in place. What it can
do instead is what this module provides:

* :func:`gather_release` builds ``tensor.index_select(dim, index)`` in a fresh private buffer a
  few MiB at a time and, after each chunk, drops the source pages it has finished reading from
  the process (``madvise(MADV_DONTNEED)``). The fresh buffer is only backed by memory where it
  has been written, so the peak is ``model + one chunk`` instead of ``model + kept tensor``.
* :func:`release_pages_` drops the resident pages of a mapped tensor (e.g. a layer removed by
  depth pruning).

Why dropping pages is safe: a clean page of a file mapping is re-read from the file (the page
cache) on the next access, so every view of the old storage still reads the same values. A page
that was *written* through a private (copy-on-write) mapping holds the only copy of that data;
such pages are found through ``/proc/self/pagemap`` (present and not file-backed) and kept. When
the page map cannot be read, private writable mappings are left alone entirely.

Everything here is Linux-only and CPU-only; elsewhere :func:`file_mapping` returns ``None`` and
callers fall back to ordinary copies.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Mapping", "file_mapping", "gather_release", "page_releaser", "release_pages_", "resident_bytes"]

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
_PM_PRESENT, _PM_SWAPPED, _PM_FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/<pid>/pagemap entry bits
_DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/self/maps`` that backs a tensor.

    Args:
        start, end: virtual address range ``[start, end)``.
        perms: ``rwxp`` flags, e.g. ``"rw-p"`` (private, copy-on-write) or ``"r--s"`` (shared).
        path: the mapped file.
    """

    start: int
    end: int
    perms: str
    path: str

    @property
    def private_writable(self) -> bool:
        """Writes through this mapping create private (anonymous) copies of pages."""
        return "w" in self.perms and self.perms.endswith("p")


def _storage_range(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` of the elements ``tensor`` (contiguous) covers."""
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def file_mapping(tensor: torch.Tensor) -> Optional[Mapping]:
    """The file mapping that holds all of ``tensor``'s elements, or ``None``.

    ``None`` for CUDA/meta tensors, anonymous memory (ordinary allocations), non-Linux systems
    and tensors spanning several mappings.

    Args:
        tensor: any tensor.
    Returns:
        The :class:`Mapping` (a file path, not ``[heap]``/``[anon:...]``) or ``None``.
    Example:
        >>> w = AutoModelForCausalLM.from_pretrained(path).model.embed_tokens.weight
        >>> file_mapping(w).path.endswith("model.safetensors")
        True
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0 or not sys.platform.startswith("linux"):
        return None
    lo, hi = _storage_range(tensor)
    for a, b, perms, inode, path in _maps():
        if a <= lo < b:
            if inode == "0" or not path.startswith("/") or hi > b:
                return None
            return Mapping(a, b, perms, path)
    return None


def _maps() -> list[tuple[int, int, str, str, str]]:
    """Every line of ``/proc/self/maps`` as ``(start, end, perms, inode, path)`` (empty if unreadable)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, perms, _off, _dev, inode, *rest = line.split(maxsplit=5)
                a, b = (int(x, 16) for x in span.split("-"))
                out.append((a, b, perms, inode, rest[0].strip() if rest else ""))
    except OSError:
        return []
    return out


def _pagemap(first_page: int, n_pages: int) -> Optional[torch.Tensor]:
    """``/proc/self/pagemap`` entries (int64, n_pages) for pages ``first_page ...``, or None if unreadable."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first_page * 8)
            raw = f.read(n_pages * 8)
    except OSError:
        return None
    if len(raw) != n_pages * 8:
        return None
    return torch.frombuffer(bytearray(raw), dtype=torch.int64)


_LIBC: list = []


def _madvise_dontneed(addr: int, nbytes: int) -> bool:
    if not _LIBC:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _LIBC.append(libc)
    return _LIBC[0].madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), _MADV_DONTNEED) == 0


def _release_range(mapping: Mapping, lo: int, hi: int) -> int:
    """Drop the clean pages lying wholly inside ``[lo, hi)``; returns the bytes advised.

    Pages shared with neighbouring data at either end are kept (they are at most two pages).
    Pages written through a private mapping (present and anonymous, or swapped) are kept too.
    """
    a = max(mapping.start, (lo + PAGE - 1) // PAGE * PAGE)
    b = min(mapping.end, hi // PAGE * PAGE)
    if b <= a:
        return 0
    n = (b - a) // PAGE
    entries = _pagemap(a // PAGE, n)
    if entries is None:
        if mapping.private_writable:
            return 0  # cannot tell clean pages from written ones: keep everything
        return (b - a) if _madvise_dontneed(a, b - a) else 0
    # a page must be kept if it holds private data: present & not file-backed, or swapped out
    signed = lambda bit: bit - (1 << 64) if bit >= 1 << 63 else bit  # noqa: E731  (int64 view of the flag)
    present = (entries & signed(_PM_PRESENT)) != 0
    private = (present & ((entries & _PM_FILE) == 0)) | ((entries & _PM_SWAPPED) != 0)
    if not bool(private.any()):
        return (b - a) if _madvise_dontneed(a, b - a) else 0
    released = 0
    keep = private.tolist()
    run = None  # start page of the current run of releasable pages
    for i, k in enumerate(keep + [True]):
        if not k and run is None:
            run = i
        elif k and run is not None:
            if _madvise_dontneed(a + run * PAGE, (i - run) * PAGE):
                released += (i - run) * PAGE
            run = None
    return released


def release_pages_(tensor: torch.Tensor) -> int:
    """Drop ``tensor``'s clean file pages from this process's memory (its values stay readable).

    Args:
        tensor: a contiguous CPU tensor; anything not backed by a file mapping is ignored.
    Returns:
        Bytes advised away (0 if nothing was released).
    Example:
        >>> release_pages_(model.model.layers[5].mlp.up_proj.weight)  # a layer depth pruning removed
        3538944
    """
    mapping = file_mapping(tensor)
    if mapping is None or not tensor.is_contiguous():
        return 0
    return _release_range(mapping, *_storage_range(tensor))


def page_releaser(tensor: torch.Tensor, min_bytes: int = 8 << 20):
    """:func:`release_pages_` if ``tensor`` is a contiguous, memory-mapped CPU tensor of at least
    ``min_bytes`` (worth dropping slices of once read), else ``None``.

    Example:
        >>> release = page_releaser(model.get_output_embeddings().weight)  # None for weights in RAM
    """
    if tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() < min_bytes or not tensor.is_contiguous():
        return None
    return release_pages_ if file_mapping(tensor) is not None else None


def resident_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s whole pages that are resident in this process (Linux; -1 if unknown)."""
    lo, hi = _storage_range(tensor)
    a, b = (lo + PAGE - 1) // PAGE * PAGE, hi // PAGE * PAGE
    if b <= a:
        return 0
    entries = _pagemap(a // PAGE, (b - a) // PAGE)
    if entries is None:
        return -1
    return int(((entries < 0)).sum()) * PAGE  # bit 63 (present) is the int64 sign bit


@torch.no_grad()
def gather_release(
    tensor: torch.Tensor, dim: int, index: torch.Tensor, chunk_bytes: int = _DEFAULT_CHUNK_BYTES
) -> torch.Tensor:
    """``tensor.index_select(dim, index)`` into a private buffer, releasing the source as it goes.

    The output is written ``chunk_bytes`` at a time; after each chunk the source pages that no
    later chunk reads are dropped (:func:`release_pages_` rules: clean file pages only). Peak
    memory is the source's resident pages + about one chunk, never source + kept copy.

    Args:
        tensor: contiguous 1-D or 2-D CPU tensor backed by a file mapping (:func:`file_mapping`).
        dim: ``0`` (rows) or ``1`` (columns; 2-D only).
        index: sorted, unique int64 keep-indices (validated by the caller).
        chunk_bytes: output bytes written between two releases.
    Returns:
        A new contiguous tensor equal to ``tensor.index_select(dim, index)``.
    Example:
        >>> out = gather_release(w, 0, torch.tensor([0, 2, 5]))  # w from a from_pretrained checkpoint
    """
    mapping = file_mapping(tensor)
    if mapping is None or not tensor.is_contiguous():
        raise ValueError("gather_release: tensor must be contiguous and backed by a file mapping")
    src = tensor.detach()
    base, end = _storage_range(src)
    if src.dim() == 1:
        src = src.view(1, -1)
        dim = 1
    R, C = src.shape
    row_bytes = C * src.element_size()
    out = torch.empty((index.numel(), C) if dim == 0 else (R, index.numel()), dtype=src.dtype)
    released = [(base + PAGE - 1) // PAGE * PAGE]  # pages below this address are already dropped

    def release_upto(addr: int) -> None:
        upto = min(addr, end) // PAGE * PAGE if addr < end else end
        if upto > released[0]:
            _release_range(mapping, released[0], upto)
            released[0] = upto

    if dim == 0:
        # out rows [i, j) come from source rows index[i:j]; rows < index[j-1] + 1 are never read again
        step = max(1, chunk_bytes // max(row_bytes, 1))
        for i in range(0, index.numel(), step):
            j = min(index.numel(), i + step)
            torch.index_select(src, 0, index[i:j], out=out[i:j])
            release_upto(base + (int(index[j - 1]) + 1) * row_bytes)
    else:
        # out rows [r0, r1) come from source rows [r0, r1) only
        step = max(1, chunk_bytes // max(index.numel() * src.element_size(), 1))
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            torch.index_select(src[r0:r1], 1, index, out=out[r0:r1])
            release_upto(base + r1 * row_bytes)
    # one last pass over the whole source: the kernel's fault-around maps up to 64 KiB of
    # neighbouring (already released) file pages back in on each read fault
    _release_range(mapping, base, end)
    return out.view(-1) if tensor.dim() == 1 else out


def release_unreferenced_pages(tensors) -> int:
    """Drop the resident pages of checkpoint file mappings that none of ``tensors`` covers.

    Stock ``from_pretrained`` memory-maps the safetensors file and converts some tensors while
    loading (e.g. a mixture-of-experts checkpoint's per-expert ``w1/w2/w3`` matrices are stacked
    into the fused 3-D expert tensors, in private memory): the file pages it read stay resident in
    the mapping, counted in the process's RSS, although no parameter reads them any more. Only
    clean file pages outside every given tensor are dropped (:func:`_release_range` rules); they
    are re-read from the file if ever touched.

    Args:
        tensors: the model's parameters and buffers.
    Returns:
        Resident bytes dropped (-1 where page residency cannot be read).
    Example:
        >>> release_unreferenced_pages(model.parameters())  # after loading a MoE checkpoint: ~the experts' size
    """
    if not sys.platform.startswith("linux"):
        return 0
    maps = [Mapping(a, b, perms, path) for a, b, perms, inode, path in _maps() if inode != "0" and path.startswith("/")]
    covered: dict[Mapping, list[tuple[int, int]]] = {}
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        lo, hi = _storage_range(t)
        for m in maps:
            if m.start <= lo < m.end:
                covered.setdefault(m, []).append((lo, hi))
                break
    gaps = []
    for m, ranges in covered.items():
        cursor = m.start
        for lo, hi in sorted(ranges):
            if lo > cursor:
                gaps.append((m, cursor, lo))
            cursor = max(cursor, hi)
        if cursor < m.end:
            gaps.append((m, cursor, m.end))
    released = 0
    for m, lo, hi in gaps:
        a, b = max(m.start, (lo + PAGE - 1) // PAGE * PAGE), min(m.end, hi // PAGE * PAGE)
        entries = _pagemap(a // PAGE, (b - a) // PAGE) if b > a else None
        if b > a and released >= 0:
            released = -1 if entries is None else released + int((entries < 0).sum()) * PAGE  # present = sign bit
        _release_range(m, lo, hi)
    return released
