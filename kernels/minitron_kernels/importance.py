"""Triton kernels for activation importance (Minitron, docs/method.md section 1).

``accumulate_triton``: one pass over an activation (B, S, D) in its own dtype (no fp32 copy,
no host sync). Grid (B, cdiv(D, BLOCK_D)); each program loops over S in tiles, reduces its
(BLOCK_D,) slice of one sample to the sequence aggregate ``x_b`` in fp32 and atomically adds
``x_b`` and ``x_b^2`` into the fp32 accumulators ``sum_x`` / ``sum_x2`` (D,).
    mean: mean_s |a|      l2: sqrt(sum_s a^2)      var: population variance over s
(``var`` merges per-tile mean / M2 with Chan's formula: one pass, no E[a^2] - E[a]^2 cancellation.)
When B * cdiv(D, BLOCK_D) programs are too few to fill the GPU (small calibration batches,
narrow activations), ``mean`` and ``l2`` split S as well (split-K style): grid
(B, cdiv(D, BLOCK_D), splits), each program adds its partial sum of |a| or a^2 into a (B, D)
fp32 scratch with atomics, and three small ops on that scratch finish x_b. ``var`` never splits.
Reference: :func:`minitron_kernels.importance_reference.accumulate_reference`, the code that runs on
CPU (the calibration hooks call its pieces), and what the kernel tests compare against.

``block_cos_sum_triton``: Block Importance (ShortGPT) numerator. Each program takes BLOCK_R
rows of (h_in, h_out) (N, D), loops over D, computes cos per row in fp32 and atomically adds
the block's sum into ``sum_cos`` (1,). O(N) extra memory at most, never N x N.
Reference: :func:`minitron_kernels.importance_reference.block_importance_reference`.

Every kernel is launched through ``torch.library.wrap_triton(kernel)[grid](...)``: inside the registered
ops of :mod:`minitron_kernels.importance_op` (``triton_op``) that lets torch.compile trace the launch
into its graph; in eager it is a direct launch there (and a small dispatch detour when the launchers are
called on their own).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .importance_reference import SEQ_AGGREGATIONS, check_seq_agg

SEQ_AGG_CODES = {name: code for code, name in enumerate(SEQ_AGGREGATIONS)}  # mean 0, l2 1, var 2


@triton.jit
def _load_seq_tile(A, s0, s_end, offs_d, mask_d, stride_s, stride_d, BLOCK_S: tl.constexpr):
    """Rows [s0, s0 + BLOCK_S) below ``s_end`` of one sample's channels ``offs_d``, as fp32 (BLOCK_S, BLOCK_D)."""
    offs_s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    m = (offs_s[:, None] < s_end) & mask_d[None, :]
    ptrs = A + offs_s[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=m, other=0.0).to(tl.float32), m


@triton.jit
def _seq_agg_kernel(
    A, SUM_X, SUM_X2,  # A: (B, S, D) any float dtype; SUM_X, SUM_X2: (D,) fp32
    S, D,
    stride_b, stride_s, stride_d,
    AGG: tl.constexpr,  # 0 mean|a|, 1 l2, 2 var
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_d = offs_d < D
    A += b * stride_b
    acc = tl.zeros((BLOCK_D,), tl.float32)  # sum|a| (mean), sum a^2 (l2), running M2 (var)
    mean = tl.zeros((BLOCK_D,), tl.float32)  # running mean (var only)
    for s0 in range(0, S, BLOCK_S):
        a, m = _load_seq_tile(A, s0, S, offs_d, mask_d, stride_s, stride_d, BLOCK_S)  # (BLOCK_S, BLOCK_D)
        if AGG == 0:
            acc += tl.sum(tl.abs(a), axis=0)
        elif AGG == 1:
            acc += tl.sum(a * a, axis=0)
        else:
            n_old = s0 * 1.0
            n_t = tl.minimum(S - s0, BLOCK_S) * 1.0
            t_mean = tl.sum(a, axis=0) / n_t
            dev = tl.where(m, a - t_mean[None, :], 0.0)
            t_m2 = tl.sum(dev * dev, axis=0)
            delta = t_mean - mean
            n_new = n_old + n_t
            mean += delta * (n_t / n_new)
            acc += t_m2 + delta * delta * (n_old * n_t / n_new)
    if AGG == 0:
        x = acc / S
    elif AGG == 1:
        x = tl.sqrt(acc)
    else:
        x = acc / S
    tl.atomic_add(SUM_X + offs_d, x, mask=mask_d)
    tl.atomic_add(SUM_X2 + offs_d, x * x, mask=mask_d)


@triton.jit
def _seq_sum_split_kernel(
    A, PARTIAL,  # A: (B, S, D) any float dtype; PARTIAL: (B, D) fp32 zero-initialised
    S, D, rows_per_split,
    stride_b, stride_s, stride_d,
    AGG: tl.constexpr,  # 0 sum |a|, 1 sum a^2
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    mask_d = offs_d < D
    s_lo = tl.program_id(2) * rows_per_split  # rows_per_split is a multiple of BLOCK_S
    s_hi = tl.minimum(s_lo + rows_per_split, S)
    A += b * stride_b
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        a, _ = _load_seq_tile(A, s0, s_hi, offs_d, mask_d, stride_s, stride_d, BLOCK_S)  # (BLOCK_S, BLOCK_D)
        if AGG == 0:
            acc += tl.sum(tl.abs(a), axis=0)
        else:
            acc += tl.sum(a * a, axis=0)
    tl.atomic_add(PARTIAL + b * D + offs_d, acc, mask=mask_d)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_to_fill(device: torch.device) -> int:
    """Programs that keep every SM busy (4 per SM); on CPU (interpreter) splitting never pays."""
    if device.type != "cuda":
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def seq_splits(b: int, s: int, d: int, seq_agg: str, target_programs: int) -> int:
    """How many pieces S is cut into so that about ``target_programs`` programs run (1 = no split)."""
    cfg = seq_agg_launch_config(s, d)
    programs = b * triton.cdiv(d, cfg["BLOCK_D"])
    if seq_agg == "var" or programs >= target_programs:
        return 1
    return max(1, min(triton.cdiv(s, cfg["BLOCK_S"]), triton.cdiv(target_programs, programs)))


def seq_agg_launch_config(s: int, d: int) -> dict:
    """Tile sizes and warps of :func:`accumulate_triton` for an activation of S positions and D channels."""
    return {"BLOCK_S": min(64, triton.next_power_of_2(s)), "BLOCK_D": min(128, triton.next_power_of_2(d)), "num_warps": 4}


def block_cos_launch_config(d: int) -> dict:
    """Tile sizes and warps of :func:`block_cos_sum_triton` for rows of D channels.

    (8, 256) tiles at 4 warps compile to ~72 registers/thread on sm_90 with no spills, where
    (16, 256) needs ~200 (4 warps) or ~170 (8 warps) and caps occupancy at one program per SM
    (``python -m minitron_kernels.aot_compile`` prints the table).
    """
    return {"BLOCK_R": 8, "BLOCK_D": min(256, triton.next_power_of_2(d)), "num_warps": 4}


def accumulate_triton(
    sum_x: torch.Tensor, sum_x2: torch.Tensor, act: torch.Tensor, seq_agg: str = "mean", splits: int | None = None
) -> None:
    """In-place ``sum_x += sum_b x_b``, ``sum_x2 += sum_b x_b^2`` with one Triton pass over ``act``.

    Args:
        sum_x: fp32 (D,) contiguous running sum.
        sum_x2: fp32 (D,) contiguous running sum of squares.
        act: (B, S, D) or (S, D) activation, any float dtype and strides (extra trailing dims
            are flattened into D like the reference).
        seq_agg: ``"mean"`` | ``"l2"`` | ``"var"``.
        splits: pieces S is cut into (``mean``/``l2`` only); default: enough programs to fill
            the GPU (:func:`seq_splits`), 1 on CPU.
    Example:
        >>> sx, sx2 = torch.zeros(64, device="cuda"), torch.zeros(64, device="cuda")
        >>> accumulate_triton(sx, sx2, torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16))
    """
    check_seq_agg(seq_agg)
    if act.dim() == 2:
        act = act.unsqueeze(0)
    if act.dim() != 3:
        act = act.reshape(act.shape[0], act.shape[1], -1)
    b, s, d = act.shape  # (B, S, D)
    assert sum_x.dtype == torch.float32 and sum_x2.dtype == torch.float32
    assert sum_x.is_contiguous() and sum_x2.is_contiguous() and sum_x.numel() == d
    if b == 0 or s == 0:
        return
    cfg = seq_agg_launch_config(s, d)
    if splits is None:
        splits = seq_splits(b, s, d, seq_agg, _programs_to_fill(act.device))
    if splits <= 1 or seq_agg == "var":
        grid = (b, triton.cdiv(d, cfg["BLOCK_D"]))
        wrap_triton(_seq_agg_kernel)[grid](
            act, sum_x, sum_x2, s, d, act.stride(0), act.stride(1), act.stride(2), AGG=SEQ_AGG_CODES[seq_agg], **cfg,
        )
        return
    rows = triton.cdiv(triton.cdiv(s, splits), cfg["BLOCK_S"]) * cfg["BLOCK_S"]  # per split, whole tiles
    partial = torch.zeros(b, d, dtype=torch.float32, device=act.device)  # (B, D) sum_s |a| or sum_s a^2
    grid = (b, triton.cdiv(d, cfg["BLOCK_D"]), triton.cdiv(s, rows))
    wrap_triton(_seq_sum_split_kernel)[grid](
        act, partial, s, d, rows, act.stride(0), act.stride(1), act.stride(2), AGG=SEQ_AGG_CODES[seq_agg], **cfg,
    )
    x = partial.div_(s) if seq_agg == "mean" else partial.sqrt_()  # (B, D) per-sample aggregate x_b
    sum_x += x.sum(0)
    sum_x2 += x.square().sum(0)


@triton.jit
def _block_cos_kernel(
    X, Y, SUM_COS,  # X, Y: (N, D) any float dtype; SUM_COS: (1,) fp32
    N, D,
    stride_x, stride_y,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    nx = tl.zeros((BLOCK_R,), tl.float32)
    ny = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = mask_r[:, None] & (cols[None, :] < D)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + rows64[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(x * y, axis=1)
        nx += tl.sum(x * x, axis=1)
        ny += tl.sum(y * y, axis=1)
    # torch.nn.functional.cosine_similarity: x.y / (max(|x|, eps) * max(|y|, eps))
    cos = dot / (tl.maximum(tl.sqrt(nx), eps) * tl.maximum(tl.sqrt(ny), eps))
    cos = tl.where(mask_r, cos, 0.0)
    tl.atomic_add(SUM_COS, tl.sum(cos, axis=0))


def block_cos_sum_triton(sum_cos: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor, eps: float = 1e-8) -> None:
    """In-place ``sum_cos += sum over rows of cos(h_in[row], h_out[row])`` (rows = all leading dims).

    Args:
        sum_cos: fp32 (1,) running sum.
        h_in, h_out: (B, S, D) (or any (..., D)) decoder-layer input / output, any float dtype.
    Example:
        >>> acc = torch.zeros(1, device="cuda")
        >>> block_cos_sum_triton(acc, h, layer(h)[0]); bi = 1 - acc / h[..., 0].numel()
    """
    d = h_in.shape[-1]
    x = h_in.reshape(-1, d)  # (N, D) view when possible
    y = h_out.reshape(-1, d)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if y.stride(-1) != 1:
        y = y.contiguous()
    n = x.shape[0]
    assert sum_cos.dtype == torch.float32 and sum_cos.numel() == 1
    if n == 0:
        return
    cfg = block_cos_launch_config(d)
    grid = (triton.cdiv(n, cfg["BLOCK_R"]),)
    wrap_triton(_block_cos_kernel)[grid](x, y, sum_cos, n, d, x.stride(0), y.stride(0), eps, **cfg)
