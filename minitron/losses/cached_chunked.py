"""The top-k + tail KD loss of a cached teacher, with its gradient computed in the forward pass.

Same math as :func:`minitron.losses.cached_reference.topk_tail_kd_loss_reference`, on the machinery of the
online chunked KD loss (:mod:`minitron.losses.kd.chunked`): per chunk of c tokens one fp32 logits GEMM into
a reused workspace buffer (:mod:`minitron.losses.kd.workspace`), a closed-form gradient w.r.t. the logits
written over that buffer, and the two gradient GEMMs of :class:`minitron.losses.kd.gemm.Gemm` (bf16 on a
CPU with native bf16 when the operands are bf16, e.g. under autocast; fp32 otherwise). No (c, V) tensor is
allocated per chunk and the logits GEMM runs once (the reference recomputes it in backward).

Gradient. With u = scaled student logits (soft-capped, divided by tau), q = softmax(u), K the cached ids,
p_k the teacher's probabilities of K, P_t = its tail mass and Q_t = sum of q outside K, the bucketed KL
``sum_k p_k log(p_k / q_k) + P_t log(P_t / Q_t)`` has

    dKL/du_j = S q_j - p_j                (j in K)
    dKL/du_j = S q_j - P_t q_j / Q_t      (j not in K),     S = sum_k p_k + P_t

S is 1 up to rounding (P_t = 1 - sum_k p_k, clamped at 0); keeping it makes the result the reference's
autograd gradient exactly. Terms with p_k == 0 or P_t == 0 drop out as in the reference. Times tau^2 for
the loss scale and 1/tau for du/ds: a net factor tau, then the soft-cap's 1 - tanh^2.

Numerics per row: the K entries of the logits buffer are read (gather, (c, k)) and then set to -inf, so
one pass gives m_t = max over the tail and e_j = exp(u_j - m_t) (0 on K), summed to
``lse_tail = m_t + log(sum e)`` with no 1 - sum cancellation; ``lse = logaddexp(lse_tail, logsumexp(u_K))``.
The tail gradient is then ``e_j * (S exp(m_t - lse) - P_t exp(m_t - lse_tail))``: both exponents are <= 0,
so no ratio of tiny masses can overflow. The per-row statistics ((c, k) and (c,) tensors) are taken in
float64, so the loss of a student close to its teacher (a small difference of O(1) terms) carries only the
rounding of the fp32 tail sum. When k covers V there is no tail and no (c, V) pass but the scatter of the K
gradients, computed in fp32 exactly as the online forward-KL chunk computes Q - P.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minitron.losses.cached_reference import _xlogy_diff
from minitron.losses.kd.gemm import Gemm
from minitron.losses.kd.workspace import workspace_for

__all__ = ["CachedKDFunction", "cached_kd_loop", "tail_chunk_"]


@dataclass
class CachedConfig:
    temperature: float
    softcap: float | None
    reduction: str
    chunk_size: int


def tail_chunk_(
    u: torch.Tensor,  # (c, V) fp32 scaled student logits, overwritten (tail exps, then the gradient)
    ids: torch.Tensor,  # (c, k) int64 distinct cached ids
    log_p: torch.Tensor,  # (c, k) fp32 teacher log-probs of the ids
    log_p_tail: torch.Tensor | None,  # (c,) fp32 log of the teacher's tail mass; None when k covers V
    scale: float | None,  # gradient factor (tau * row weight); None: loss only
) -> torch.Tensor:
    """Per-token bucketed KL (c,) (without the tau^2); with ``scale``, ``u`` ends up holding ``scale * dKL/du``.

    Args:
        u: the chunk's fp32 logits after soft-cap and 1/tau, in a buffer this call owns.
        ids: the cached top-k ids of each row.
        log_p: the teacher's log-probabilities of those ids.
        log_p_tail: the teacher's log tail mass, or None when the ids cover the vocabulary.
        scale: multiply the gradient by this; None computes the loss only (``u`` is left as scratch).
    Returns:
        (c,) fp32 KL per row.
    Example:
        >>> kl = tail_chunk_(u.clone(), ids, log_p, log_p_tail, 1.0)
    """
    # per-row statistics in float64: (c, k) and (c,) only, so the loss carries no extra fp32 rounding of
    # the log-normaliser beyond the fp32 sum over the tail (the KL of a student close to its teacher is a
    # small difference of O(1) terms)
    u_k = u.gather(1, ids).double()  # (c, k)
    lse_k = u_k.logsumexp(-1)  # (c,) log of the student's unnormalised mass on K
    log_p = log_p.double()
    p_k = log_p.exp()  # (c, k)
    if log_p_tail is None:  # k covers V: plain KL over the k ids, nothing outside them
        log_q_k = u_k - lse_k[:, None]
        kl = _xlogy_diff(p_k, log_p, log_q_k).sum(-1)
        if scale is not None:  # fp32 here, as the online forward-KL chunk computes Q - P for the same case
            u32, p32 = u_k.float(), p_k.float()
            log_q32 = u32 - u32.logsumexp(-1, keepdim=True)
            vals = (log_q32.exp_().mul_(p32.sum(-1, keepdim=True)).sub_(p32)).mul_(scale)  # (c, k)
            u.scatter_(1, ids, vals)  # ids cover every column
        return kl.float()
    u.scatter_(1, ids, float("-inf"))  # the tail only; K entries give exp(-inf) = 0 below
    m_t = u.amax(-1, keepdim=True)  # (c, 1); NaN rows stay NaN
    sum_t = u.sub_(m_t).exp_().sum(-1)  # (c,); u holds e_j = exp(u_j - m_t)
    m_t = m_t.squeeze(-1).double()
    lse_tail = sum_t.double().log_().add_(m_t)  # (c,)
    lse = torch.logaddexp(lse_tail, lse_k)  # (c,) the student's full log-normaliser
    log_q_k = u_k - lse[:, None]  # (c, k)
    log_q_tail = lse_tail - lse  # (c,)
    log_p_tail = log_p_tail.double()
    p_t = log_p_tail.exp()
    kl = _xlogy_diff(p_k, log_p, log_q_k).sum(-1) + _xlogy_diff(p_t, log_p_tail, log_q_tail)
    if scale is not None:
        s_sum = p_k.sum(-1) + p_t  # (c,) S, 1 up to rounding
        coef = (s_sum * (m_t - lse).exp() - p_t * (m_t - lse_tail).exp()).mul_(scale)  # (c,)
        vals = (log_q_k.exp_().mul_(s_sum[:, None]).sub_(p_k)).mul_(scale)  # (c, k)
        u.mul_(coef.float()[:, None]).scatter_(1, ids, vals.float())
    return kl.float()


def cached_kd_loop(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
    ids: torch.Tensor, log_p: torch.Tensor, log_p_tail: torch.Tensor | None,
    cfg: CachedConfig, need: tuple[bool, bool, bool] | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the chunks. Returns ``(loss (scalar fp32, reduced), grad_hidden (n, H), grad_weight, grad_bias)``.

    ``need`` is which of (hidden, weight, bias) get a gradient (fp32 accumulators), None for the loss only.
    """
    n, dev, v = h.shape[0], h.device, w.shape[0]
    want = need is not None
    space = workspace_for(h)
    gs = Gemm(w, h.dtype, space, "s", grads=want)
    c_max = max(min(cfg.chunk_size, n), 1)
    tau = cfg.temperature
    inv_tau = 1.0 / tau
    row_w = 1.0 / max(n, 1) if cfg.reduction == "mean" else 1.0
    scale = tau * row_w if want else None  # tau^2 loss scale times 1/tau of d(s/tau)/ds, per-row weight
    gh = torch.zeros(h.shape, dtype=torch.float32, device=dev) if want and need[0] else None  # (n, H)
    gw = torch.zeros(w.shape, dtype=torch.float32, device=dev) if want and need[1] else None  # (V, H)
    gb = torch.zeros(v, dtype=torch.float32, device=dev) if want and need[2] and b is not None else None  # (V,)
    # bf16 gradient GEMMs (cpu_bf16 / native): the fp32 gradient is rounded once into this buffer
    gbuf = space.get("g16", (c_max, v), gs.grad_dtype, dev) if want and gs.grad_dtype != torch.float32 else None
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for i in range(0, n, cfg.chunk_size):
        j = min(i + cfg.chunk_size, n)
        h_c = h[i:j]  # (c, H)
        u = gs.logits(h_c, b, c_max)  # (c, V) fp32, workspace
        cap_grad = None  # d capped / d raw = 1 - tanh^2
        if cfg.softcap:
            u.div_(cfg.softcap).tanh_()
            if want:
                cap_grad = torch.mul(u, u, out=space.get("cap", (c_max, v), torch.float32, dev)[: j - i]).neg_().add_(1.0)
            u.mul_(cfg.softcap)
        if inv_tau != 1.0:
            u.mul_(inv_tau)
        tail = None if log_p_tail is None else log_p_tail[i:j]
        total += tail_chunk_(u, ids[i:j], log_p[i:j], tail, scale).sum()
        if not want:
            continue
        if cap_grad is not None:
            u.mul_(cap_grad)
        g = u if gbuf is None else gbuf[: j - i].copy_(u)  # (c, V) in the gradient GEMMs' dtype
        if gh is not None:
            gh[i:j] = gs.grad_act(g)
        if gw is not None:
            gs.acc_grad_weight_(gw, g, h_c)
        if gb is not None:
            gb += g.sum(0, dtype=torch.float32)
    total *= tau * tau * row_w
    return total, gh, gw, gb


class CachedKDFunction(torch.autograd.Function):
    """Autograd wrapper: the gradients are computed in forward and scaled by the incoming scalar in backward."""

    @staticmethod
    def forward(ctx, h, w, b, ids, log_p, log_p_tail, cfg):  # noqa: D102
        need = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad)
        loss, gh, gw, gb = cached_kd_loop(h, w, b, ids, log_p, log_p_tail, cfg, need)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        go = grad_out.float()
        # scale the saved fp32 grads in place: backward runs once (no retain_graph double use)
        grads = [None if g is None else g.mul_(go).to(dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None, None
