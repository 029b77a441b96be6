"""Pure-PyTorch reference of one chunk of the fused linear + KD loss (no Triton needed).

Given fp32 logits of one chunk of tokens for the student (c, Vs) and the teacher (c, Vt),
return the per-token divergence (c,) scaled by tau^2 and, optionally, the gradient of
``sum_i row_scale[i] * loss[i]`` with respect to the student logits (c, Vs) in fp32.
The Triton kernel in :mod:`minitron_kernels.fused_kl` computes exactly this.

Gradients w.r.t. the student logits s (P = teacher, Q = student, at temperature tau;
the tau^2 loss scale and the 1/tau of d(s/tau)/ds give a net factor tau):
    forward KL(P||Q):  tau * (Q - P)
    reverse KL(Q||P):  tau * (Q (log Q - log P) - Q * KL(Q||P))
    jsd(beta):         tau * (1 - beta) * (Q (log Q - log M) - Q * KL(Q||M)),  M = beta P + (1 - beta) Q
Zero-probability entries (``-inf`` logits from vocab padding or top-k masking) contribute 0.
"""

from __future__ import annotations

from typing import Callable

import torch

from minitron.losses.kd.workspace import workspace_for

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2


def loss_kind(loss: str, beta: float) -> int:
    """Map (loss, beta) to a kernel code; jsd with beta 0/1 is forward/reverse KL (Liger convention)."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return FORWARD_KL
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        return REVERSE_KL
    if loss == "jsd":
        return JSD
    raise ValueError(f"unknown loss={loss!r}; allowed values: forward_kl, reverse_kl, jsd")


def topk_mask_(s_logits: torch.Tensor, t_logits: torch.Tensor, top_k: int) -> None:
    """Keep only the teacher's top-k vocabulary entries per row: set the rest to -inf in place.

    Setting both sides to ``-inf`` outside the teacher's top-k set is the same as gathering
    the k entries and renormalising (ModelOpt ``TopKLogitsKLLoss``). Vocab padding is
    implicit: columns beyond a side's vocab count as ``-inf``.
    """
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    v = max(vs, vt)
    if top_k >= v:
        return
    k = min(top_k, vt)
    idx = t_logits.topk(k, dim=-1).indices  # (c, k)
    keep = torch.zeros(t_logits.shape[0], v, dtype=torch.bool, device=t_logits.device)  # (c, V)
    keep.scatter_(1, idx, True)
    t_logits.masked_fill_(~keep[:, :vt], float("-inf"))
    s_logits.masked_fill_(~keep[:, :vs], float("-inf"))


def _pad(x: torch.Tensor, v: int, buf: Callable[[str], torch.Tensor], name: str) -> torch.Tensor:
    """(c, Vx) -> (c, v) with -inf columns appended, in workspace buffer ``name`` (no copy when Vx == v)."""
    if x.shape[1] == v:
        return x
    out = buf(name).fill_(float("-inf"))
    out[:, : x.shape[1]] = x
    return out


def _log_softmax_(x: torch.Tensor, inv_tau: float, tmp: torch.Tensor) -> torch.Tensor:
    """In-place log_softmax(x * inv_tau) over the last dim; ``tmp`` (c, V) holds exp(x - max)."""
    x.mul_(inv_tau)
    m = x.amax(dim=-1, keepdim=True)  # (c, 1); finite for any row with one finite logit
    lse = torch.sub(x, m, out=tmp).exp_().sum(dim=-1, keepdim=True).log_().add_(m)  # (c, 1)
    return x.sub_(lse)


def _xlog_(la: torch.Tensor, lb: torch.Tensor, a: torch.Tensor, out: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``a * (la - lb)`` into ``out`` with 0 where a == 0 (no 0 * inf NaN); ``zero`` (c, V) bool scratch."""
    torch.sub(la, lb, out=out).mul_(a)
    return out.masked_fill_(torch.le(a, 0.0, out=zero), 0.0)


def kd_chunk_reference(
    s_logits: torch.Tensor,  # (c, Vs) fp32, overwritten
    t_logits: torch.Tensor,  # (c, Vt) fp32, overwritten
    row_scale: torch.Tensor | None,  # (c,) fp32, None -> no gradient
    kind: int = FORWARD_KL,
    beta: float = 0.5,
    temperature: float = 1.0,
    grad_out: torch.Tensor | None = None,  # (c, Vs) any float dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss (c,) and grad logits (c, Vs) (``row_scale``-weighted), computed in fp32.

    Works in place on the chunk's logits buffers (the chunked path owns them; pass clones to keep
    the inputs); its (c, V) temporaries are reused buffers of :mod:`minitron.losses.kd.workspace`,
    so a chunk allocates nothing of size (c, V) once the first one has run.

    Args:
        s_logits: student logits of the chunk, fp32 (may hold ``-inf`` from top-k masking).
        t_logits: teacher logits of the chunk, fp32.
        row_scale: weight of each row's loss in the gradient (e.g. 1/n for a mean); None skips it.
        kind: ``FORWARD_KL`` | ``REVERSE_KL`` | ``JSD``.
        beta: JSD mixing coefficient (only for ``JSD``).
        temperature: softmax temperature tau; the loss is multiplied by tau^2.
        grad_out: optional (c, Vs) buffer (e.g. bf16, the dtype of the gradient GEMMs) that
            receives the gradient, rounded once from fp32; default: fp32 in the student buffer.
    Returns:
        ``(loss (c,), grad (c, Vs) or None)``; ``grad`` is ``grad_out`` when one is given.
    Example:
        >>> loss, grad = kd_chunk_reference(s.clone(), t.clone(), torch.full((s.shape[0],), 1 / n))
    """
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    c, v = s_logits.shape[0], max(vs, vt)
    inv_tau = 1.0 / temperature
    want = row_scale is not None
    space = workspace_for(s_logits)

    def buf(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # (c, V) scratch, reused
        return space.get(f"ref_{name}", (c, v), dtype, s_logits.device)

    zero = buf("zero", torch.bool)
    log_q = _log_softmax_(_pad(s_logits, v, buf, "pad_s"), inv_tau, buf("a"))  # (c, V) student
    log_p = _log_softmax_(_pad(t_logits, v, buf, "pad_t"), inv_tau, buf("a"))  # (c, V) teacher
    if kind == FORWARD_KL:
        p = torch.exp(log_p, out=buf("a"))  # (c, V)
        loss = _xlog_(log_p, log_q, p, buf("b"), zero).sum(-1)  # (c,)
        grad = log_q.exp_().sub_(p) if want else None  # Q - P, in the student buffer
    elif kind == REVERSE_KL:
        q = torch.exp(log_q, out=buf("a"))
        grad = _xlog_(log_q, log_p, q, buf("b"), zero)  # Q (log Q - log P)
        loss = grad.sum(-1)
        grad = grad.sub_(q.mul_(loss[:, None])) if want else None
    else:
        p, q = torch.exp(log_p, out=buf("a")), torch.exp(log_q, out=buf("b"))
        log_m = torch.mul(p, beta, out=buf("m")).add_(q, alpha=1.0 - beta).log_()  # M = beta P + (1 - beta) Q
        loss_p = _xlog_(log_p, log_m, p, buf("d"), zero).sum(-1)
        grad = _xlog_(log_q, log_m, q, log_p, zero)  # Q (log Q - log M), in the teacher buffer
        kl_qm = grad.sum(-1)
        loss = beta * loss_p + (1.0 - beta) * kl_qm
        grad = grad.sub_(q.mul_(kl_qm[:, None])).mul_(1.0 - beta) if want else None
    if grad is not None:
        grad = grad[:, :vs].mul_(temperature * row_scale[:, None])
        if grad_out is not None:
            grad = grad_out.copy_(grad)
    return loss * (temperature * temperature), grad
