"""Intermediate-state distillation losses (the logits KD is :func:`minitron.losses.linear_kd_loss`).

- :class:`IntermediateProjections` + :func:`intermediate_state_loss`: student decoder-layer outputs
  through a learned ``Linear(h_s, h_t)`` per layer pair vs the teacher's, MSE or 1 - cosine,
  averaged over pairs (docs/method.md section 4, ``L_is``).
- :func:`dynamic_alpha`: ModelOpt's ``LogitsAndIntermediatesLossBalancer`` scale, detached
  ``L_logits / L_is``, so ``alpha * L_is`` has the magnitude of ``L_logits``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IntermediateProjections", "dynamic_alpha", "intermediate_state_loss"]


class IntermediateProjections(nn.Module):
    """One learned ``Linear(h_s, h_t)`` per (student_layer, teacher_layer) pair.

    Square projections (h_s == h_t) start as the identity with zero bias, others with the
    default ``nn.Linear`` init.

    Args:
        pairs: ``[(student_layer, teacher_layer), ...]`` decoder-layer indices.
        student_hidden: h_s.
        teacher_hidden: h_t.
    Example:
        >>> proj = IntermediateProjections([(0, 1)], 16, 32)
        >>> proj.proj[0](torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, pairs: Sequence[tuple[int, int]], student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.proj = nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in self.pairs)
        if student_hidden == teacher_hidden:
            with torch.no_grad():
                for lin in self.proj:
                    lin.weight.copy_(torch.eye(student_hidden))
                    lin.bias.zero_()


def intermediate_state_loss(
    student_states: Sequence[torch.Tensor],  # each (B, T, Hs)
    teacher_states: Sequence[torch.Tensor],  # each (B, T, Ht)
    projections: nn.ModuleList | Sequence[nn.Module],
    mask: torch.Tensor | None = None,  # (B, T) bool, True = counts
    kind: str = "mse",
) -> torch.Tensor:
    """Intermediate-state loss ``L_is`` averaged over layer pairs.

    Per pair: ``p = proj(s)`` (fp32); ``mse``: mean over hidden dims of ``(p - t)^2``;
    ``cosine``: ``1 - cos(p, t)`` over the hidden dim; then mean over counted tokens.

    Args:
        student_states: student hidden states per pair, (B, T, Hs) each.
        teacher_states: teacher hidden states per pair, (B, T, Ht) each (treated as constants).
        projections: one module (B, T, Hs) -> (B, T, Ht) per pair.
        mask: optional (B, T) bool, True where the token counts.
        kind: ``"mse"`` or ``"cosine"``.
    Returns:
        Scalar fp32 loss.
    Example:
        >>> proj = IntermediateProjections([(0, 0)], 8, 8).proj
        >>> intermediate_state_loss([torch.randn(2, 3, 8)], [torch.randn(2, 3, 8)], proj)
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"unknown intermediate loss kind={kind!r}; allowed: mse, cosine")
    if not (len(student_states) == len(teacher_states) == len(projections)) or len(student_states) == 0:
        raise ValueError(
            f"need the same non-zero number of student states, teacher states and projections, got "
            f"{len(student_states)}, {len(teacher_states)}, {len(projections)}"
        )
    total = None
    for s, t, proj in zip(student_states, teacher_states, projections):
        p = proj(s).float()  # (B, T, Ht)
        t = t.detach().float()  # (B, T, Ht)
        if kind == "mse":
            per_tok = (p - t).pow(2).mean(-1)  # (B, T)
        else:
            per_tok = 1.0 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)  # (B, T)
        if mask is None:
            pair_loss = per_tok.mean()
        else:
            m = mask.to(per_tok.device, torch.bool)
            pair_loss = per_tok.masked_fill(~m, 0.0).sum() / m.sum().clamp_min(1)
        total = pair_loss if total is None else total + pair_loss
    return total / len(student_states)


def dynamic_alpha(logits_loss: torch.Tensor, is_loss: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale of ``L_is``: detached ``L_logits / L_is`` (ModelOpt's loss balancer), no host sync.

    Args:
        logits_loss: scalar logits KD loss.
        is_loss: scalar intermediate-state loss.
        eps: floor of the denominator.
    Returns:
        Detached scalar alpha; ``logits_loss + alpha * is_loss`` has twice the value of
        ``logits_loss`` while the gradient of the L_is part is rescaled by alpha.
    Example:
        >>> dynamic_alpha(torch.tensor(2.0), torch.tensor(0.5))
        tensor(4.)
    """
    return logits_loss.detach() / is_loss.detach().clamp_min(eps)
