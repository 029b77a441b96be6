"""KD loss against a cached teacher: top-k logits + the log-sum-exp of the full distribution.

An offline teacher (:mod:`minitron.distillation.teacher_cache`) stores per token its top-k logits
``z_k`` and ids, and ``lse = logsumexp(z / tau)`` over its whole vocabulary. That gives the teacher's
exact probabilities of the k ids, ``p_k = exp(z_k / tau - lse)``, and the exact mass of everything
else, ``P_tail = 1 - sum_k p_k``. The loss is the forward KL between the teacher and the student
distributions over k + 1 outcomes (the k ids and one "tail" bucket), times tau^2:

    KL = sum_k p_k (log p_k - log q_k) + P_tail (log P_tail - log Q_tail),   Q_tail = 1 - sum_k q_k

It is exact about the tail's mass (unlike renormalising over the k ids), never exceeds the full KL
(grouping outcomes cannot increase a KL) and equals it when k covers the vocabulary.

Implementation: :mod:`minitron.losses.cached_chunked` (chunks of ``chunk_size`` tokens, one fp32 logits
GEMM each into a reused buffer, closed-form gradient computed in the forward pass, the GEMM precision
rules of the online KD loss, :mod:`minitron.losses.kd.gemm`); memory O(chunk_size * V), no (N, V)
tensor. The plain-autograd version it is tested against is
:func:`minitron.losses.cached_reference.topk_tail_kd_loss_reference`.
"""

from __future__ import annotations

import functools

import torch

from minitron.losses.cached_chunked import CachedConfig, CachedKDFunction, cached_kd_loop
from minitron.losses.cached_reference import log_tail, prepare_cached, topk_tail_kd_loss_reference
from minitron.losses.precision import outside_autocast

__all__ = ["log_tail", "topk_tail_kd_loss", "topk_tail_kd_loss_reference"]


@functools.partial(outside_autocast, operands=2)
def topk_tail_kd_loss(
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

    Under autocast the two GEMM operands (hidden states, weight) are cast to the autocast dtype and the
    loss runs with autocast off, as :func:`minitron.losses.kd.api.linear_kd_loss` does: fp32 logits, and
    on a CPU with native bf16 the two gradient GEMMs in bf16.

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
        fp32 scalar loss (NaN when a counted row's hidden states are not finite).
    Example:
        >>> t = torch.randn(6, 50)
        >>> top = t.topk(8, -1)
        >>> h, w = torch.randn(6, 16, requires_grad=True), torch.randn(50, 16)
        >>> topk_tail_kd_loss(h, w, top.indices, top.values, t.logsumexp(-1)).backward()
    """
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (e.g. 1024)")
    h, ids, log_p, log_p_tail = prepare_cached(student_hidden, student_weight, topk_ids, topk_logits, teacher_lse,
                                               temperature=temperature, mask=mask, reduction=reduction)
    cfg = CachedConfig(temperature=float(temperature), softcap=student_softcap, reduction=reduction,
                       chunk_size=chunk_size)
    b = student_bias
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, student_weight, b)):
        return CachedKDFunction.apply(h, student_weight, b, ids, log_p, log_p_tail, cfg)
    return cached_kd_loop(h, student_weight, b, ids, log_p, log_p_tail, cfg, None)[0]
