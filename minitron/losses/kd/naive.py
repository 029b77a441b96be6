"""Naive reference for the linear + KL distillation loss (materialises full fp32 logits).

This is the ground truth the chunked and Triton paths of :func:`minitron.losses.linear_kd_loss`
are tested against, and the ``impl="naive"`` path itself. It is deliberately plain
autograd: project both hidden states to logits in fp32, pad the smaller vocabulary with
``-inf``, optionally restrict to the teacher's top-k tokens (ModelOpt ``TopKLogitsKLLoss``
style: gather both sides at the teacher's top-k indices and renormalise), and compute the
divergence per token (docs/method.md section 4/5).

Divergences (P = teacher, Q = student, both softmax(logits / tau)), Liger JSD convention:
    forward_kl:  KL(P || Q) = sum_v P (log P - log Q)
    reverse_kl:  KL(Q || P) = sum_v Q (log Q - log P)
    jsd(beta):   beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta * P + (1 - beta) * Q,
                 with beta == 0 -> forward_kl and beta == 1 -> reverse_kl (Liger special cases).
Every per-token loss is multiplied by tau^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")


def keep_mask(
    n: int,
    device: torch.device,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Bool (N,) of the tokens that count: ``mask`` AND ``labels != ignore_index`` (each optional)."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & mask.reshape(-1).to(device=device, dtype=torch.bool)
    if labels is not None:
        keep = keep & (labels.reshape(-1).to(device) != ignore_index)
    return keep


def _xlogratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a * (log_a - log_b)`` with ``0 * (anything) = 0`` and NaN-free gradients where a == 0."""
    pos = a > 0
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    la = torch.where(pos, log_a, zero)
    lb = torch.where(pos, log_b, zero)
    return torch.where(pos, a * (la - lb), zero)


def divergence_from_logits(
    student_logits: torch.Tensor,  # (n, Vs)
    teacher_logits: torch.Tensor,  # (n, Vt)
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-token divergence (n,) in fp32, scaled by tau^2 (see module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss={loss!r}; allowed values: {', '.join(LOSSES)}")
    s = student_logits.float() / temperature  # (n, Vs)
    t = teacher_logits.float() / temperature  # (n, Vt)
    v = max(s.shape[-1], t.shape[-1])
    if s.shape[-1] < v:  # pad with -inf, never zeros
        s = F.pad(s, (0, v - s.shape[-1]), value=float("-inf"))
    if t.shape[-1] < v:
        t = F.pad(t, (0, v - t.shape[-1]), value=float("-inf"))
    if top_k is not None and top_k < v:
        idx = t.topk(top_k, dim=-1).indices  # (n, k)
        t = t.gather(-1, idx)
        s = s.gather(-1, idx)
    log_q = torch.log_softmax(s, dim=-1)  # student
    log_p = torch.log_softmax(t, dim=-1)  # teacher
    q, p = log_q.exp(), log_p.exp()
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        per_tok = _xlogratio(p, log_p, log_q).sum(-1)
    elif loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        per_tok = _xlogratio(q, log_q, log_p).sum(-1)
    else:
        m = beta * p + (1.0 - beta) * q
        log_m = torch.where(m > 0, m, torch.ones_like(m)).log()
        log_m = torch.where(m > 0, log_m, torch.full_like(m, float("-inf")))
        per_tok = beta * _xlogratio(p, log_p, log_m).sum(-1) + (1.0 - beta) * _xlogratio(q, log_q, log_m).sum(-1)
    return per_tok * (temperature * temperature)


def reduce_loss(per_tok: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce per-kept-token losses: mean over counted tokens (0 if none), sum, or scatter to (N,)."""
    if reduction == "mean":
        return per_tok.sum() / keep.sum().clamp_min(1).to(per_tok.dtype)
    if reduction == "sum":
        return per_tok.sum()
    if reduction == "none":
        out = per_tok.new_zeros(keep.shape[0])
        return out.masked_scatter(keep, per_tok)
    raise ValueError(f"unknown reduction={reduction!r}; allowed values: {', '.join(REDUCTIONS)}")


def linear_kd_loss_naive(
    student_hidden: torch.Tensor,  # (N, Hs)
    student_weight: torch.Tensor,  # (Vs, Hs)
    teacher_hidden: torch.Tensor,  # (N, Ht)
    teacher_weight: torch.Tensor,  # (Vt, Ht)
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    reduction: str = "mean",
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> torch.Tensor:
    """Reference linear + KD loss: full fp32 logits, plain autograd (memory O(N * V)).

    Args: see :func:`minitron.losses.linear_kd_loss`.
    Returns:
        Scalar loss (``mean``/``sum``) or per-token (N,) fp32 losses (``none``, 0 where masked).
    Example:
        >>> hs, ws = torch.randn(8, 16, requires_grad=True), torch.randn(50, 16)
        >>> linear_kd_loss_naive(hs, ws, torch.randn(8, 32), torch.randn(50, 32)).backward()
    """
    n = student_hidden.shape[0]
    keep = keep_mask(n, student_hidden.device, mask, labels, ignore_index)
    idx = keep.nonzero().squeeze(-1)  # (n_kept,)
    hs = student_hidden.index_select(0, idx).float()
    ht = teacher_hidden.detach().index_select(0, idx).float()
    s_logits = hs @ student_weight.float().t()  # (n_kept, Vs) fp32
    if student_bias is not None:
        s_logits = s_logits + student_bias.float()
    with torch.no_grad():
        t_logits = ht @ teacher_weight.detach().float().t()  # (n_kept, Vt) fp32
        if teacher_bias is not None:
            t_logits = t_logits + teacher_bias.detach().float()
        if teacher_softcap:
            t_logits = torch.tanh(t_logits / teacher_softcap) * teacher_softcap
    if student_softcap:
        s_logits = torch.tanh(s_logits / student_softcap) * student_softcap
    per_tok = divergence_from_logits(s_logits, t_logits, loss, beta, temperature, top_k)  # (n_kept,)
    return reduce_loss(per_tok, keep, reduction)
