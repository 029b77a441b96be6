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

import torch

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


def _xlog(a: torch.Tensor, la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """a * (la - lb) with 0 where a == 0 (forward only, no autograd)."""
    return torch.where(a > 0, a * (la - lb), torch.zeros((), dtype=a.dtype, device=a.device))


def kd_chunk_reference(
    s_logits: torch.Tensor,  # (c, Vs) fp32
    t_logits: torch.Tensor,  # (c, Vt) fp32
    row_scale: torch.Tensor | None,  # (c,) fp32, None -> no gradient
    kind: int = FORWARD_KL,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token loss (c,) and grad logits (c, Vs) (``row_scale``-weighted), fp32.

    Args:
        s_logits: student logits of the chunk, fp32 (may hold ``-inf`` from top-k masking).
        t_logits: teacher logits of the chunk, fp32.
        row_scale: weight of each row's loss in the gradient (e.g. 1/n for a mean); None skips it.
        kind: ``FORWARD_KL`` | ``REVERSE_KL`` | ``JSD``.
        beta: JSD mixing coefficient (only for ``JSD``).
        temperature: softmax temperature tau; the loss is multiplied by tau^2.
    Returns:
        ``(loss (c,), grad (c, Vs) or None)``.
    """
    vs, vt = s_logits.shape[-1], t_logits.shape[-1]
    v = max(vs, vt)
    inv_tau = 1.0 / temperature
    s = torch.full((s_logits.shape[0], v), float("-inf"), dtype=torch.float32, device=s_logits.device)  # (c, V)
    t = torch.full_like(s, float("-inf"))  # (c, V)
    s[:, :vs] = s_logits * inv_tau
    t[:, :vt] = t_logits * inv_tau
    log_q = torch.log_softmax(s, dim=-1)  # student
    log_p = torch.log_softmax(t, dim=-1)  # teacher
    q, p = log_q.exp(), log_p.exp()
    if kind == FORWARD_KL:
        loss = _xlog(p, log_p, log_q).sum(-1)  # (c,)
        grad = (q - p) if row_scale is not None else None
    elif kind == REVERSE_KL:
        term = _xlog(q, log_q, log_p)  # (c, V)
        loss = term.sum(-1)
        grad = (term - q * loss[:, None]) if row_scale is not None else None
    else:
        m = beta * p + (1.0 - beta) * q
        log_m = m.log()
        term_q = _xlog(q, log_q, log_m)  # (c, V)
        kl_qm = term_q.sum(-1)  # (c,)
        loss = beta * _xlog(p, log_p, log_m).sum(-1) + (1.0 - beta) * kl_qm
        grad = (1.0 - beta) * (term_q - q * kl_qm[:, None]) if row_scale is not None else None
    if grad is not None:
        grad = grad[:, :vs] * (temperature * row_scale[:, None])
    return loss * (temperature * temperature), grad
