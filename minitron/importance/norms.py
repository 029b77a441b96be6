"""RMSNorm statistics that correct the norm shrinkage caused by hidden-channel pruning.

An RMSNorm divides each token ``x`` (D,) by ``rms_D(x) = sqrt(mean_d x_d^2)``. After pruning the
hidden axis to the channels ``K``, the pruned model divides by ``rms_K(x_K)`` instead. Importance
keeps the large channels, so ``rms_K > rms_D`` and every norm output shrinks by
``r = rms_K(x_K) / rms_D(x)``. Multiplying the kept norm weights by ``r`` restores the
original scale.

Per token, with the normalised input ``n = x / rms_D(x)`` (so that ``mean_d n_d^2 = 1``),
``r^2 = mean_{k in K} n_k^2``. Calibration keeps, per norm site, the per-channel mean over
tokens ``m_d = E[n_d^2]``; at prune time, for any kept set ``K``,

    scale = sqrt(E[r^2]) = sqrt(mean_{k in K} m_k)

(the root of the mean squared ratio, which is what a single per-site scalar can restore).
LayerNorm (mean-centred, with bias) is left as it is: its shift is not a single scale.
"""

from __future__ import annotations

import torch
from torch import nn


def is_rms_norm(norm: nn.Module) -> bool:
    """True for RMSNorm-style modules (a weight, no mean subtraction); False for ``nn.LayerNorm``."""
    return not isinstance(norm, nn.LayerNorm) and getattr(norm, "weight", None) is not None


def norm_eps(norm: nn.Module) -> float:
    """The epsilon an RMSNorm adds to the mean square (HF names it ``variance_epsilon`` or ``eps``)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def normalized_square_sum(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, int]:
    """Sum over tokens of ``x_d^2 / (mean_d x_d^2 + eps)``, per channel.

    Args:
        x: norm input (B, S, D) (or any (..., D)).
        eps: the norm's epsilon.
    Returns:
        ``(sums, tokens)``: fp32 (D,) and the number of tokens summed.
    Example:
        >>> normalized_square_sum(torch.ones(2, 3, 4), 0.0)
        (tensor([6., 6., 6., 6.]), 6)
    """
    x = x.float().reshape(-1, x.shape[-1])  # (N, D)
    # sum_n x_nd^2 * w_n with w_n = 1 / (mean_d x_nd^2 + eps): the row norms need no temporary, and
    # the weighted column sum is one matrix-vector product (~8x faster than normalising x first)
    w = torch.linalg.vector_norm(x, dim=-1).square_().div_(x.shape[1]).add_(eps).reciprocal_()  # (N,)
    return torch.mv(x.square().t(), w), x.shape[0]


def rescale_factor(mean_sq: torch.Tensor, keep: torch.Tensor) -> float:
    """Scale for the kept norm weights: ``sqrt(mean_{k in keep} mean_sq[k])``.

    Args:
        mean_sq: (D,) calibrated ``E[n_d^2]`` of one norm site.
        keep: kept channel indices.
    Returns:
        The factor ``rms_K / rms_D`` (root mean square over calibration tokens).
    Example:
        >>> rescale_factor(torch.tensor([2.0, 2.0, 0.0, 0.0]), torch.tensor([0, 1]))
        1.4142135381698608
    """
    return float(mean_sq[keep].double().mean().sqrt())
