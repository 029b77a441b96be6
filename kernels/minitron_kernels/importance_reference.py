"""The pure-PyTorch importance reduction: what runs on CPU, and what the kernels of
:mod:`minitron_kernels.importance` are tested against (one implementation, two callers).

``accumulate_reference`` is what ``accumulate_triton`` computes: per-sample sequence aggregates
``x_b`` (B, D) of an activation (B, S, D), folded into fp32 running sums of ``x_b`` and ``x_b^2``::

    mean: x_b = mean_s |a|      l2: x_b = sqrt(sum_s a^2)      var: x_b = population variance over s

``block_importance_reference`` is what ``block_cos_sum_triton`` computes: the running sum of the row
cosines of a decoder layer's input and output (Block Importance, ShortGPT / Minitron depth).

Both are built from the chunked pieces the calibration hooks (:class:`minitron.importance.hooks.
CalibrationHooks`) call directly on their fused per-batch buffers: :func:`seq_aggregate_into`,
:func:`fold_aggregates_` and :func:`cosine_sum_`. The element-wise part of each runs over chunks of
at most ``CHUNK_BYTES`` (whole samples, or sequence rows when one sample is larger) in a reused
:class:`Scratch` buffer, so an activation is read once and no activation-sized fp32 temporary is
ever allocated; sums accumulate in fp32 whatever the activation's dtype.
"""

from __future__ import annotations

import math

import torch

SEQ_AGGREGATIONS = ("mean", "l2", "var")
CHUNK_BYTES = 1 << 20  # scratch per element-wise step: fits a typical L2 cache
EPS = 1e-8  # cosine denominator clamp, as torch.nn.functional.cosine_similarity


class Scratch:
    """One reusable buffer viewed as any float dtype (fp32 storage).

    Every chunk is at most ``CHUNK_BYTES`` or one row, so ``reserve(max_row_elems)`` sizes it once
    (the hooks call it before a forward pass, so nothing is allocated mid-pass); ``get`` grows it
    only if a caller asks for more.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def reserve(self, max_row_elems: int, device: torch.device) -> None:
        n = max(CHUNK_BYTES // 4, max_row_elems)
        if self._buf is None or self._buf.numel() < n or self._buf.device != device:
            self._buf = torch.empty(n, dtype=torch.float32, device=device)

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        if dtype.itemsize > 4:
            return torch.empty(shape, dtype=dtype, device=device)
        per = 4 // dtype.itemsize  # elements of `dtype` per fp32 slot
        if self._buf is None or self._buf.numel() * per < n or self._buf.device != device:
            self._buf = torch.empty(max(CHUNK_BYTES // 4, -(-n // per)), dtype=torch.float32, device=device)
        return self._buf.view(dtype)[:n].view(shape)


def check_seq_agg(seq_agg: str) -> None:
    """Raise ``ValueError`` naming the allowed values when ``seq_agg`` is unknown."""
    if seq_agg not in SEQ_AGGREGATIONS:
        raise ValueError(f"unknown seq_agg={seq_agg!r}; allowed values: {', '.join(SEQ_AGGREGATIONS)}")


def seq_aggregate_into(out: torch.Tensor, act: torch.Tensor, seq_agg: str, scratch: Scratch) -> None:
    """Write the per-sample sequence statistic of ``act`` (B, S, D) into ``out`` (B, D) fp32 (may be strided).

    ``mean``: ``sum_s |a|`` and ``l2``: ``sum_s a^2`` (:func:`fold_aggregates_` finishes them: / S,
    sqrt); ``var``: the population variance over S (final). ``|a|`` is taken in the activation's own
    dtype (exact), ``a^2`` in fp32; every sum accumulates in fp32.
    """
    B, S, D = act.shape
    if seq_agg == "var":  # rare option: the plain formula, sample by sample to bound the fp32 copy
        for b in range(B):
            out[b] = act[b].float().var(dim=0, unbiased=False)
        return
    rows = max(1, CHUNK_BYTES // (D * 4))  # sequence rows per chunk
    samples = max(1, rows // S)  # whole samples per chunk when a sample fits
    if samples > 1 or rows >= S:
        windows = [(b, min(B, b + samples), 0, S) for b in range(0, B, samples)]
    else:
        windows = [(b, b + 1, s, min(S, s + rows)) for b in range(B) for s in range(0, S, rows)]
    for b0, b1, s0, s1 in windows:
        chunk = act[b0:b1, s0:s1]  # (b, s, D)
        if seq_agg == "mean":
            tmp = scratch.get(tuple(chunk.shape), act.dtype, act.device)
            torch.abs(chunk, out=tmp)
        else:  # l2: square in fp32
            tmp = scratch.get(tuple(chunk.shape), torch.float32, act.device)
            if act.dtype == torch.float32:
                torch.mul(chunk, chunk, out=tmp)
            else:
                tmp.copy_(chunk).square_()
        if s0 == 0:
            torch.sum(tmp, dim=1, dtype=torch.float32, out=out[b0:b1])
        else:
            out[b0:b1] += tmp.sum(dim=1, dtype=torch.float32)


def fold_aggregates_(sum_x: torch.Tensor, sum_x2: torch.Tensor, x: torch.Tensor, seq_agg: str, seq_len: int) -> None:
    """Finish :func:`seq_aggregate_into`'s ``x`` (B, D) in place and fold it: ``sum_x += sum_b x_b``,
    ``sum_x2 += sum_b x_b^2`` (both fp32 (D,))."""
    if seq_agg == "mean":
        x.div_(seq_len)  # sum_s |a| -> mean_s |a|
    elif seq_agg == "l2":
        x.sqrt_()  # sum_s a^2 -> ||a||_2 over the sequence
    sum_x += x.sum(dim=0)
    sum_x2 += x.square().sum(dim=0)


def row_dot(a: torch.Tensor, b: torch.Tensor, scratch: Scratch, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise dot product of two (N, D) tensors in fp32 -> ``out`` (N,), chunked through ``scratch``."""
    N, D = a.shape
    out = torch.empty(N, dtype=torch.float32, device=a.device) if out is None else out
    rows = max(1, CHUNK_BYTES // (D * 4))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        tmp = scratch.get((r1 - r0, D), torch.float32, a.device)
        if a.dtype == torch.float32 and b.dtype == torch.float32:
            torch.mul(a[r0:r1], b[r0:r1], out=tmp)
        else:
            tmp.copy_(a[r0:r1]).mul_(b[r0:r1])
        torch.sum(tmp, dim=1, out=out[r0:r1])
    return out


def cosine_sum_(sum_cos: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scratch: Scratch,
                n_in: torch.Tensor | None = None, n_out: torch.Tensor | None = None,
                dot: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_cos += sum over rows of cos(a[row], b[row])`` for (N, D) ``a``, ``b``, in fp32.

    ``cos = a.b / (max(|a|, eps) * max(|b|, eps))``, as ``torch.nn.functional.cosine_similarity``.

    Args:
        sum_cos: fp32 (1,) running sum.
        a, b: (N, D) rows, any float dtype.
        scratch: the chunk buffer of :func:`row_dot`.
        n_in: ``|a|`` per row (N,) fp32 if already known (the hooks reuse the previous layer's ``n_out``).
        n_out, dot: (N,) fp32 buffers to write ``|b|`` and the cosines into (default: new tensors).
    Returns:
        ``n_out``, the row norms of ``b``.
    """
    if n_in is None:
        n_in = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
    if n_out is None:
        n_out = torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32)
    else:
        torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32, out=n_out)
    cos = row_dot(a, b, scratch, out=dot)
    cos.div_(n_in.clamp_min(EPS).mul_(n_out.clamp_min(EPS)))
    sum_cos += cos.sum()
    return n_out


def accumulate_reference(sum_x: torch.Tensor, sum_x2: torch.Tensor, act: torch.Tensor, seq_agg: str = "mean") -> None:
    """Reference update: ``sum_x += sum_b x_b`` and ``sum_x2 += sum_b x_b^2`` in place.

    Args:
        sum_x: fp32 (D,) running sum of per-sample sequence aggregates.
        sum_x2: fp32 (D,) running sum of their squares.
        act: activation (B, S, D) or (S, D) in any float dtype (extra trailing dims are flattened into D).
        seq_agg: ``"mean"`` | ``"l2"`` | ``"var"``.
    Example:
        >>> sx, sx2 = torch.zeros(8), torch.zeros(8)
        >>> accumulate_reference(sx, sx2, torch.ones(2, 3, 8)); sx[0].item(), sx2[0].item()
        (2.0, 2.0)
    """
    check_seq_agg(seq_agg)
    if act.dim() == 2:
        act = act.unsqueeze(0)
    act = act.reshape(act.shape[0], act.shape[1], -1)  # (B, S, D)
    x = torch.empty(act.shape[0], act.shape[2], dtype=torch.float32, device=act.device)  # (B, D)
    scratch = Scratch()
    seq_aggregate_into(x, act, seq_agg, scratch)
    fold_aggregates_(sum_x, sum_x2, x, seq_agg, act.shape[1])


def block_importance_reference(sum_cos: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
    """Reference: ``sum_cos += sum over rows of cos(h_in[row], h_out[row])`` in fp32, O(B*S) memory.

    Args:
        sum_cos: fp32 (1,) running sum.
        h_in, h_out: decoder-layer input and output (B, S, D) in any float dtype.
    Example:
        >>> acc = torch.zeros(1); h = torch.randn(2, 5, 8)
        >>> block_importance_reference(acc, h, 2 * h); round(acc.item(), 4)
        10.0
    """
    D = h_in.shape[-1]
    cosine_sum_(sum_cos, h_in.reshape(-1, D), h_out.reshape(-1, D), Scratch())
