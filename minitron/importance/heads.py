"""Attention-head criteria beyond the paper's: each head's contribution after ``o_proj``.

The paper scores a query head by the L2 over ``head_dim`` of the per-channel statistics of the
``o_proj`` input (``input`` criterion). That ignores ``o_proj`` itself: a head with large
activations can write little into the residual stream. The ``output`` criterion scores the
vector the head actually adds to the residual stream at each token,
``y_h = W_o[:, h] @ a_h`` (D,), by its norm, aggregated like every other site
(sequence mean, batch L2). With ``W_h = Q_h R_h`` (QR of the head's (D, hd) ``o_proj`` columns),
``||y_h|| = ||R_h a_h||``: only an (hd, hd) triangular factor per head is applied to each token,
never the (B, S, H, D) per-head outputs.
"""

from __future__ import annotations

import torch

HEAD_METRICS = ("output", "input", "loss")
DEFAULT_HEAD_METRIC = "output"  # measured best on SmolLM2-135M (benchmarks/results/prune_quality_real.md)


def check_head_metric(metric: str) -> None:
    """Raise ``ValueError`` naming the allowed values if ``metric`` is unknown."""
    if metric not in HEAD_METRICS:
        raise ValueError(f"unknown head_metric={metric!r}; allowed values: {', '.join(HEAD_METRICS)}")


def head_output_norms(act: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Norm of each head's contribution to the ``o_proj`` output, per token.

    Args:
        act: ``o_proj`` input (B, S, n_heads * head_dim); head h owns columns ``h*hd:(h+1)*hd``.
        o_weight: ``o_proj`` weight (D, n_heads * head_dim).
        n_heads: query heads.
    Returns:
        fp32 (B, S, n_heads): ``||o_weight[:, h*hd:(h+1)*hd] @ act[b, s, h*hd:(h+1)*hd]||_2``.

    Example:
        >>> head_output_norms(torch.randn(2, 5, 4 * 8), torch.randn(16, 4 * 8), 4).shape
        torch.Size([2, 5, 4])
    """
    b, s, width = act.shape
    hd = width // n_heads
    a = act.float().reshape(b * s, n_heads, hd)  # (N, H, hd)
    w = o_weight.float().view(o_weight.shape[0], n_heads, hd).transpose(0, 1)  # (H, D, hd)
    # W_h = Q_h R_h (R_h: (hd, hd) upper triangular), so ||W_h a|| = ||R_h a||: one small (hd, hd)
    # product per head and token instead of a (D, hd) one; QR needs no positive-definite Gram matrix
    r = torch.linalg.qr(w, mode="r").R  # (H, hd, hd)
    z = torch.einsum("nhj,hij->nhi", a, r)  # (N, H, hd) = R_h a_h
    return torch.linalg.vector_norm(z, dim=-1).view(b, s, n_heads)
