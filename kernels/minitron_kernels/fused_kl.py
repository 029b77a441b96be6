"""Triton kernels for one chunk of the fused linear + KD loss (Liger style).

The host loop (:mod:`minitron.losses.kd.chunked`, through the registered op ``torch.ops.minitron.kd_chunk``,
a ``triton_op``: the kernel is launched through ``torch.library.wrap_triton``) computes a chunk's logits
with one fp32-output GEMM per model and calls :func:`kd_chunk_triton`, which runs one program per token row:

    pass 1  online softmax statistics (running max, sum-exp) of student AND teacher over
            vocab tiles, in one sweep                          -> lse_s, lse_t
    pass 2  per-token divergence (and, for reverse KL / JSD, the row dot <Q, g>)
    pass 3  gradient w.r.t. the student logits, rounded once into the dtype of the gradient
            GEMMs (bf16 buffer on the native CUDA path, else in place over the fp32 student
            logits); forward KL folds it into pass 2

Everything is fp32. Columns beyond a side's vocab read as ``-inf`` (vocab padding, never
zeros); ``0 * log 0`` terms are masked so padding never yields NaN. Memory: the (c, V)
logits buffers of the chunk, nothing of size N x V. The reference is
:func:`minitron.losses.kd.reference.kd_chunk_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2  # kernel codes, as minitron.losses.kd.reference.loss_kind returns

_NEG_BIG = -1.0e30  # finite "minus infinity" for running maxima (avoids inf - inf = NaN)


@triton.jit
def _online_lse_kernel_part(x, m, l):
    """Fold one tile ``x`` (BLOCK_V,) into running max ``m`` and sum-exp ``l``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, l


@triton.jit
def _kd_chunk_kernel(
    S, T, G, LOSS, SCALE,  # S: (c, Vs) fp32 student logits; T: (c, Vt) fp32; G: (c, Vs) grads, any float
    stride_s, stride_t, stride_g,  # dtype (may alias S: each element is read before it is written)
    Vs, Vt, V,
    inv_tau, tau, beta,
    KIND: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    T += row * stride_t
    G += row * stride_g
    cols = tl.arange(0, BLOCK_V)

    # pass 1: online max / sum-exp of both distributions in one sweep over the vocab
    m_s = tl.full((), -1.0e30, tl.float32)
    l_s = tl.zeros((), tl.float32)
    m_t = tl.full((), -1.0e30, tl.float32)
    l_t = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        s = tl.load(S + c, mask=c < Vs, other=-float("inf")).to(tl.float32) * inv_tau
        t = tl.load(T + c, mask=c < Vt, other=-float("inf")).to(tl.float32) * inv_tau
        m_s, l_s = _online_lse_kernel_part(s, m_s, l_s)
        m_t, l_t = _online_lse_kernel_part(t, m_t, l_t)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)

    # pass 2: divergence (+ forward-KL gradient, + row dot for reverse KL / JSD)
    loss = tl.zeros((), tl.float32)
    dot = tl.zeros((), tl.float32)
    scale = 0.0
    if HAS_GRAD:
        scale = tl.load(SCALE + row) * tau
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        log_q = tl.load(S + c, mask=c < Vs, other=-float("inf")).to(tl.float32) * inv_tau - lse_s
        log_p = tl.load(T + c, mask=c < Vt, other=-float("inf")).to(tl.float32) * inv_tau - lse_t
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if KIND == 0:
            loss += tl.sum(tl.where(p > 0, p * (log_p - log_q), 0.0), axis=0)
            if HAS_GRAD:
                tl.store(G + c, ((q - p) * scale).to(G.dtype.element_ty), mask=c < Vs)
        elif KIND == 1:
            loss += tl.sum(tl.where(q > 0, q * (log_q - log_p), 0.0), axis=0)
        else:
            mix = beta * p + (1.0 - beta) * q
            log_m = tl.log(mix)
            term_q = tl.where(q > 0, q * (log_q - log_m), 0.0)
            dot += tl.sum(term_q, axis=0)
            loss += beta * tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), axis=0) + (1.0 - beta) * tl.sum(
                term_q, axis=0
            )
    tl.store(LOSS + row, loss * tau * tau)

    # pass 3: gradient for reverse KL / JSD (needs the full-row dot first)
    if HAS_GRAD and KIND != 0:
        if KIND == 1:
            dot = loss
        for v0 in range(0, Vs, BLOCK_V):
            c = v0 + cols
            log_q = tl.load(S + c, mask=c < Vs, other=-float("inf")).to(tl.float32) * inv_tau - lse_s
            log_p = tl.load(T + c, mask=c < Vt, other=-float("inf")).to(tl.float32) * inv_tau - lse_t
            q = tl.exp(log_q)
            if KIND == 1:
                g = tl.where(q > 0, q * (log_q - log_p), 0.0) - q * dot
            else:
                log_m = tl.log(beta * tl.exp(log_p) + (1.0 - beta) * q)
                g = (1.0 - beta) * (tl.where(q > 0, q * (log_q - log_m), 0.0) - q * dot)
            tl.store(G + c, (g * scale).to(G.dtype.element_ty), mask=c < Vs)


def launch_config(v: int) -> dict:
    """Block size and warps for a chunk whose padded vocab is ``v`` (one program per token row)."""
    block_v = min(4096, triton.next_power_of_2(v))
    return {"BLOCK_V": block_v, "num_warps": 8 if block_v >= 2048 else 4}


def kd_chunk_triton(
    s_logits: torch.Tensor,  # (c, Vs) fp32, contiguous rows; overwritten with grads unless grad_out is given
    t_logits: torch.Tensor,  # (c, Vt) fp32
    row_scale: torch.Tensor | None,  # (c,) fp32 or None
    kind: int = 0,
    beta: float = 0.5,
    temperature: float = 1.0,
    grad_out: torch.Tensor | None = None,  # (c, Vs) any float dtype, unit column stride
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of :func:`kd_chunk_reference` (same arguments and returns).

    The gradient is written straight into ``grad_out`` in its dtype (one rounding from fp32,
    no extra pass to convert), or in place over ``s_logits`` when no buffer is given, so the
    chunk needs no extra fp32 (c, V) buffer.

    Example:
        >>> loss, grad = kd_chunk_triton(s.float(), t.float(), torch.full((s.shape[0],), 1 / n))
    """
    c, vs = s_logits.shape
    vt = t_logits.shape[1]
    assert s_logits.dtype == torch.float32 and t_logits.dtype == torch.float32
    assert s_logits.stride(1) == 1 and t_logits.stride(1) == 1
    has_grad = row_scale is not None
    g = s_logits if grad_out is None or not has_grad else grad_out
    assert g.shape == s_logits.shape and g.stride(1) == 1
    loss = torch.empty(c, dtype=torch.float32, device=s_logits.device)  # (c,)
    if c == 0:
        return loss, (g if has_grad else None)
    cfg = launch_config(max(vs, vt))
    if block_v is not None:
        cfg["BLOCK_V"] = block_v
    scale = row_scale.float().contiguous() if has_grad else loss  # dummy pointer when unused
    wrap_triton(_kd_chunk_kernel)[(c,)](
        s_logits, t_logits, g, loss, scale,
        s_logits.stride(0), t_logits.stride(0), g.stride(0),
        vs, vt, max(vs, vt),
        1.0 / temperature, float(temperature), float(beta),
        KIND=kind, HAS_GRAD=has_grad, **cfg,
    )
    return loss, (g if has_grad else None)
