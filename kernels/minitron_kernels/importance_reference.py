"""Pure-PyTorch references of the importance kernels in :mod:`minitron_kernels.importance`.

``accumulate_reference`` is what ``accumulate_triton`` computes: per-sample sequence aggregates
``x_b`` (B, D) of an activation (B, S, D), folded into fp32 running sums of ``x_b`` and ``x_b^2``.
``block_importance_reference`` is what ``block_cos_sum_triton`` computes: the running sum of the
row cosines of a decoder layer's input and output (Block Importance, ShortGPT / Minitron depth).
Both are the ``impl="reference"`` paths of :mod:`minitron.importance.aggregate` and the ground
truth the kernels are tested against.
"""

from __future__ import annotations

import torch

SEQ_AGGREGATIONS = ("mean", "l2", "var")


def sequence_aggregate(act: torch.Tensor, seq_agg: str = "mean") -> torch.Tensor:
    """Reduce an activation (B, S, D) over S in fp32 -> (B, D)."""
    a = act.float()
    if seq_agg == "mean":
        return a.abs().mean(dim=1)
    if seq_agg == "l2":
        return a.square().sum(dim=1).sqrt()
    if seq_agg == "var":
        return a.var(dim=1, unbiased=False)
    raise ValueError(f"unknown seq_agg={seq_agg!r}; allowed values: {', '.join(SEQ_AGGREGATIONS)}")


def accumulate_reference(sum_x: torch.Tensor, sum_x2: torch.Tensor, act: torch.Tensor, seq_agg: str = "mean") -> None:
    """Reference update: ``sum_x += sum_b x_b`` and ``sum_x2 += sum_b x_b^2`` in place.

    Args:
        sum_x: fp32 (D,) running sum of per-sample sequence aggregates.
        sum_x2: fp32 (D,) running sum of their squares.
        act: activation (B, S, D) or (S, D) in any float dtype.
        seq_agg: ``"mean"`` | ``"l2"`` | ``"var"``.
    """
    if act.dim() == 2:
        act = act.unsqueeze(0)
    x = sequence_aggregate(act.reshape(act.shape[0], act.shape[1], -1), seq_agg)  # (B, D)
    sum_x += x.sum(dim=0)
    sum_x2 += x.square().sum(dim=0)


def block_importance_reference(sum_cos: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
    """Reference: ``sum_cos += sum over rows of cos(h_in[row], h_out[row])`` in fp32, O(B*S) memory.

    Args:
        sum_cos: fp32 (1,) running sum.
        h_in, h_out: decoder-layer input and output (B, S, D) in any float dtype.
    """
    cos = torch.nn.functional.cosine_similarity(
        h_in.reshape(-1, h_in.shape[-1]).float(), h_out.reshape(-1, h_out.shape[-1]).float(), dim=-1
    )  # (B*S,)
    sum_cos += cos.sum()
