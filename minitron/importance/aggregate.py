"""Streaming aggregation of activations into per-channel importance.

Minitron (arXiv 2407.14679, docs/method.md section 1) scores a channel ``d`` of an
activation ``a`` of shape (B, S, D) by reducing over the sequence, then over the
batch. The winning combination, and our default, is batch=L2 / seq=mean::

    acc[d] += sum_b (mean_s |a[b, s, d]|)^2        score[d] = sqrt(acc[d])

Calibration data arrives in many batches, so the batch reduction is streamed:
an :class:`ImportanceAccumulator` holds fp32 running sums of ``x_b`` and
``x_b^2`` (``x_b`` = the per-sample sequence aggregate, shape (D,)) and a sample
count; memory is O(D) whatever the number of batches. Every batch aggregation
(mean, L2, variance) is derived from those three numbers at the end.

Sequence aggregations (per sample b, channel d, over the S positions):
    mean: mean_s |a|          l2: sqrt(sum_s a^2)          var: var_s a (population)
Batch aggregations (over the samples' sequence aggregates x_b):
    mean: sum_b x_b / n       l2: sqrt(sum_b x_b^2)        var: sum x^2/n - (sum x/n)^2

``accumulate_`` and ``block_importance_update_`` call the registered ops
``torch.ops.minitron.importance_accumulate_`` / ``block_cos_sum_`` (:mod:`minitron_kernels.importance_op`),
which run the Triton kernels of :mod:`minitron_kernels.importance` or their references in
:mod:`minitron_kernels.importance_reference` (re-exported here; the same code the calibration hooks run
on CPU), as :mod:`minitron.dispatch` picks; they return the name of the path that ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minitron.dispatch import Dispatch
from minitron_kernels import importance_op  # noqa: F401 - registers the ops called below
from minitron_kernels.importance_reference import (  # noqa: F401 - re-exported
    SEQ_AGGREGATIONS,
    accumulate_reference,
    block_importance_reference,
    check_seq_agg,
)

ACCUMULATE = Dispatch("minitron_kernels.importance:accumulate_triton", accumulate_reference)
BLOCK_COS = Dispatch("minitron_kernels.importance:block_cos_sum_triton", block_importance_reference)
BATCH_AGGREGATIONS = ("mean", "l2", "var")


def check_aggregation(batch_agg: str, seq_agg: str | None = None) -> None:
    """Raise ``ValueError`` naming the field when an aggregation is unknown (``seq_agg=None``: not checked)."""
    if batch_agg not in BATCH_AGGREGATIONS:
        raise ValueError(f"unknown batch_agg={batch_agg!r}; allowed values: {', '.join(BATCH_AGGREGATIONS)}")
    if seq_agg is not None:
        check_seq_agg(seq_agg)


def finalize(sum_x: torch.Tensor, sum_x2: torch.Tensor, count: int, batch_agg: str = "l2") -> torch.Tensor:
    """Turn running sums into scores (D,) with the chosen batch aggregation."""
    if batch_agg == "l2":
        return sum_x2.sqrt()
    n = max(count, 1)
    if batch_agg == "mean":
        return sum_x / n
    if batch_agg == "var":
        return (sum_x2 / n - (sum_x / n).square()).clamp_min(0.0)
    raise ValueError(f"unknown batch_agg={batch_agg!r}; allowed values: {', '.join(BATCH_AGGREGATIONS)}")


@dataclass
class ImportanceAccumulator:
    """fp32 running statistics of one activation site (memory O(D))."""

    dim: int
    device: torch.device | str = "cpu"
    seq_agg: str = "mean"
    sum_x: torch.Tensor = field(init=False)
    sum_x2: torch.Tensor = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        self.sum_x2 = torch.zeros(self.dim, dtype=torch.float32, device=self.device)

    def update(self, act: torch.Tensor, impl: str = "auto") -> None:
        """Fold one activation (B, S, D) into the running sums (no host sync)."""
        if act.shape[-1] != self.dim:
            raise ValueError(f"activation last dim {act.shape[-1]} != accumulator dim {self.dim}")
        if self.sum_x.device != act.device:
            self.sum_x = self.sum_x.to(act.device)
            self.sum_x2 = self.sum_x2.to(act.device)
        accumulate_(self.sum_x, self.sum_x2, act.detach(), self.seq_agg, impl=impl)
        self.count += act.shape[0] if act.dim() == 3 else 1

    def scores(self, batch_agg: str = "l2") -> torch.Tensor:
        return finalize(self.sum_x, self.sum_x2, self.count, batch_agg).cpu()


def accumulate_(
    sum_x: torch.Tensor, sum_x2: torch.Tensor, act: torch.Tensor, seq_agg: str = "mean", impl: str = "auto"
) -> str:
    """Update running sums in place with the best available implementation.

    Args:
        impl: ``"auto"`` (Triton on CUDA, else reference), ``"triton"`` or ``"reference"``.
    Returns:
        The name of the path that ran.
    """
    choice = ACCUMULATE.select(impl, act.device)
    torch.ops.minitron.importance_accumulate_(sum_x, sum_x2, act.detach(), seq_agg, choice.name == "triton")
    return choice.name


IMPLS = ACCUMULATE.impls  # ("auto", "triton", "reference")


def block_importance_update_(sum_cos: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor, impl: str = "auto") -> str:
    """Accumulate the Block-Importance cosine sum of one layer in place; returns the path used.

    ``BI = 1 - sum_cos / n_rows`` once all calibration batches are in (ShortGPT / Minitron depth).

    Args:
        sum_cos: fp32 (1,) running sum of row cosines.
        h_in, h_out: decoder-layer input and output (B, S, D), any float dtype.
        impl: ``"auto"`` (Triton on CUDA when triton imports, else reference), ``"triton"``, ``"reference"``.
    Returns:
        ``"triton"`` or ``"reference"``.
    Example:
        >>> acc = torch.zeros(1)
        >>> block_importance_update_(acc, torch.randn(2, 5, 8), torch.randn(2, 5, 8), impl="reference")
        'reference'
    """
    if h_in.shape != h_out.shape:
        raise ValueError(f"h_in {tuple(h_in.shape)} and h_out {tuple(h_out.shape)} differ")
    choice = BLOCK_COS.select(impl, h_in.device)
    torch.ops.minitron.block_cos_sum_(sum_cos, h_in.detach(), h_out.detach(), choice.name == "triton")
    return choice.name
