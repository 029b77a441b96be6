"""Calibration over several processes (``torchrun``): each rank its share of the blocks, sums all-reduced.

Every importance statistic is a sum over calibration samples (per-site ``sum_x`` / ``sum_x2`` of the
per-sample aggregates, sample counts, Block-Importance cosine sums and token counts, RMSNorm
normalised-square sums and token counts). A sample's contribution does not depend on which other
samples share its batch, so N processes that each calibrate a contiguous 1/N of the blocks and then
add their sums (one ``all_reduce`` per accumulator) get the single-process statistics up to the
order of the floating-point additions: N hosts or GPUs calibrate N times the data in the same time.
Plain ``torch.distributed`` (gloo on CPU, NCCL on GPUs); a single process is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "rank_blocks", "world"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration blocks (all of them in a single process).

    Args:
        blocks: LongTensor (n, seq_len), the same on every rank.
    Returns:
        (n_r, seq_len) with ``sum_r n_r = n``.
    Raises:
        ValueError: fewer blocks than ranks.
    Example:
        >>> rank_blocks(torch.zeros(10, 4, dtype=torch.long)).shape  # rank 1 of 2: torch.Size([5, 4])
    """
    rank, size = world()
    if size == 1:
        return blocks
    if blocks.shape[0] < size:
        raise ValueError(f"{blocks.shape[0]} calibration blocks for {size} ranks: every rank needs at least one; "
                         f"pass num_samples >= {size}")
    return torch.tensor_split(blocks, size)[rank]


def all_reduce_(tensors: list[torch.Tensor], counts: list[int]) -> list[int]:
    """Sum ``tensors`` (in place) and ``counts`` over the ranks; returns the summed counts.

    Args:
        tensors: accumulators on this rank's device (fp32 sums).
        counts: integer accumulators (samples, tokens).
    Returns:
        The summed counts, in order.
    """
    _, size = world()
    if size == 1:
        return list(counts)
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    device = tensors[0].device if tensors else torch.device("cpu")
    packed = torch.tensor(counts, dtype=torch.float64, device=device)  # exact for counts below 2**53
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return [int(c) for c in packed.tolist()]
