"""Reference KD loss against a cached teacher (autograd + activation checkpointing), and its input checks.

The fast path :func:`minitron.losses.cached.topk_tail_kd_loss` computes the same loss with its gradient
in the forward pass; this module keeps the plain-autograd version as the ground truth of its tests.

An offline teacher (:mod:`minitron.distillation.teacher_cache`) stores per token its top-k logits
``z_k`` and ids, and ``lse = logsumexp(z / tau)`` over its whole vocabulary. That gives the teacher's
exact probabilities of the k ids, ``p_k = exp(z_k / tau - lse)``, and the exact mass of everything
else, ``P_tail = 1 - sum_k p_k``. The loss is the forward KL between the teacher and the student
distributions over k + 1 outcomes (the k ids and one "tail" bucket), times tau^2:

    KL = sum_k p_k (log p_k - log q_k) + P_tail (log P_tail - log Q_tail),   Q_tail = 1 - sum_k q_k

It is exact about the tail's mass (unlike renormalising over the k ids), never exceeds the full KL
(grouping outcomes cannot increase a KL) and equals it when k covers the vocabulary. Student logits
are computed in chunks of ``chunk_size`` tokens (fp32) and recomputed in backward (activation
checkpointing): memory O(chunk_size * V), no (N, V) tensor.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["log_tail", "prepare_cached", "topk_tail_kd_loss_reference"]


def log_tail(log_p: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_k exp(log_p_k))`` over the last dim, stable when the k ids hold almost all the mass.

    Args:
        log_p: (..., k) log-probabilities of k distinct outcomes.
    Returns:
        (...,) log of the remaining mass; ``-inf`` when the k ids hold all of it (up to rounding).
    Example:
        >>> log_tail(torch.log(torch.tensor([0.5, 0.25]))).exp()
        tensor(0.2500)
    """
    lse_k = torch.logsumexp(log_p, dim=-1).clamp(max=0.0)  # log of the k ids' mass, <= 0
    return torch.log(-torch.expm1(lse_k))  # log(1 - e^lse_k), no cancellation near 0


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` with 0 where p == 0 (no 0 * inf NaN, no NaN gradient)."""
    pos = p > 0
    return torch.where(pos, p * (torch.where(pos, log_p, 0.0) - torch.where(pos, log_q, 0.0)), 0.0)


def _chunk_kl(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, ids: torch.Tensor, log_p: torch.Tensor,
              log_p_tail: torch.Tensor | None, inv_tau: float, softcap: float | None) -> torch.Tensor:
    """Summed bucketed KL of one chunk: h (c, H), ids / log_p (c, k), log_p_tail (c,) or None (k covers V)."""
    s = h.float() @ w.float().t()  # (c, V) fp32
    if b is not None:
        s = s + b.float()
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    s = s * inv_tau
    lse_s = torch.logsumexp(s, dim=-1)  # (c,)
    log_q = s.gather(1, ids) - lse_s[:, None]  # (c, k)
    kl = _xlogy_diff(log_p.exp(), log_p, log_q).sum(-1)
    if log_p_tail is not None:
        # the student's tail straight from its logits (logsumexp of the other ids): no 1 - sum cancellation
        log_q_tail = s.scatter(1, ids, float("-inf")).logsumexp(-1) - lse_s  # (c,)
        kl = kl + _xlogy_diff(log_p_tail.exp(), log_p_tail, log_q_tail)
    return kl.sum()


def prepare_cached(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor, *, temperature: float, mask: torch.Tensor | None, reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check the inputs of the top-k + tail loss and keep the counted rows.

    Args:
        student_hidden, student_weight, topk_ids, topk_logits, teacher_lse, temperature, mask, reduction: as
            :func:`topk_tail_kd_loss_reference`.
    Returns:
        ``(h (n, H), ids (n, k) int64, log_p (n, k) fp32, log_p_tail (n,) fp32 or None when k covers V)`` for
        the n counted rows; ``h`` keeps its autograd graph (an ``index_select`` of the input when masked).
    Example:
        >>> h, ids, log_p, log_p_tail = prepare_cached(h, w, ids, z, lse, temperature=1.0, mask=None,
        ...                                            reduction="mean")
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction={reduction!r}; allowed values: mean, sum")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    h = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, H)
    n, v = h.shape[0], student_weight.shape[0]
    if h.shape[1] != student_weight.shape[1]:
        raise ValueError(f"student_hidden has hidden size {h.shape[1]} but student_weight is "
                         f"{tuple(student_weight.shape)}: pass the hidden states of the model owning this lm_head")
    if (topk_ids.shape != topk_logits.shape or topk_ids.dim() < 2 or topk_ids.shape[:-1].numel() != n
            or teacher_lse.numel() != n):
        raise ValueError(f"cached teacher tensors do not fit {n} tokens: ids {tuple(topk_ids.shape)}, logits "
                         f"{tuple(topk_logits.shape)}, lse {tuple(teacher_lse.shape)}; they must be (N, k), (N, k), (N,)")
    ids, z, lse = topk_ids.reshape(n, -1), topk_logits.reshape(n, -1), teacher_lse.reshape(-1)
    if ids.numel() and int(ids.max()) >= v:
        raise ValueError(f"cached teacher ids reach {int(ids.max())} but the student has {v} vocabulary rows: build "
                         "the cache with vocab_size=<the student's vocabulary>")
    if mask is not None:
        rows = (mask.reshape(-1).to(h.device) != 0).nonzero().squeeze(-1)  # (n_kept,)
        h, ids, z, lse = h.index_select(0, rows), ids.index_select(0, rows), z.index_select(0, rows), lse.index_select(0, rows)
    inv_tau = 1.0 / temperature
    with torch.no_grad():
        log_p = z.float() * inv_tau - lse.float()[:, None]  # (n, k) teacher log-probs of the k ids
        # the teacher's tail mass 1 - sum p_k (its other logits are not cached); none when k covers V
        log_p_tail = log_tail(log_p) if ids.shape[1] < v else None  # (n,)
    ids = ids.long()
    return h, ids, log_p, log_p_tail


def topk_tail_kd_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
    student_softcap: float | None = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the teacher's cached top-k ids plus one tail bucket, times tau^2.

    The reference: plain autograd through fp32 logits recomputed in backward (the (c, V) GEMM runs twice);
    run it with autocast off (under autocast its ``h.float() @ w.float().t()`` would run in bf16).

    Args:
        student_hidden: (N, H) or (B, S, H) final hidden states of the student.
        student_weight: (V, H) student lm_head weight.
        topk_ids: (N, k) / (B, S, k) the teacher's top-k token ids (distinct, < V).
        topk_logits: (N, k) / (B, S, k) the teacher's logits at those ids (soft-capped if the teacher is).
        teacher_lse: (N,) / (B, S) ``logsumexp(teacher_logits / temperature)`` over the teacher's vocabulary.
        student_bias: optional (V,) lm_head bias.
        temperature: tau; must be the one ``teacher_lse`` was computed at.
        mask: optional (N,) / (B, S); tokens where it is 0 do not count.
        reduction: ``"mean"`` over counted tokens (0 if none) or ``"sum"``.
        chunk_size: tokens per chunk.
        student_softcap: the student's final-logit soft-cap (Gemma 2), None for none.
    Returns:
        fp32 scalar loss.
    Example:
        >>> t = torch.randn(6, 50)
        >>> top = t.topk(8, -1)
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(50, 16)
        >>> topk_tail_kd_loss_reference(h, w, top.indices, top.values, t.logsumexp(-1)).backward()
    """
    h, ids, log_p, log_p_tail = prepare_cached(student_hidden, student_weight, topk_ids, topk_logits, teacher_lse,
                                               temperature=temperature, mask=mask, reduction=reduction)
    inv_tau = 1.0 / temperature
    total = h.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (h.requires_grad or student_weight.requires_grad)
    for i in range(0, h.shape[0], chunk_size):
        tail = None if log_p_tail is None else log_p_tail[i:i + chunk_size]
        args = (h[i:i + chunk_size], student_weight, student_bias, ids[i:i + chunk_size], log_p[i:i + chunk_size],
                tail, inv_tau, student_softcap)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if grad else _chunk_kl(*args))
    total = total * (temperature * temperature)
    if reduction == "sum":
        return total
    return total / max(h.shape[0], 1)
