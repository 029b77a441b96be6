"""The scaled parameter-budget rule: the shape of ``prune(params=...)`` when no calibration data measures it.

With calibration data :func:`minitron.pruning.budget.choose_budget_target` measures candidate shapes
instead; both count parameters with :mod:`minitron.pruning.params`.

Budget rule (``--params``), width first because the Minitron ablations found
width pruning retains more quality than depth pruning at equal size:
1. keep every layer and every attention head;
2. scale ``hidden_size`` and ``intermediate_size`` by the same factor ``s``, each
   rounded down to its divisor, and take the largest ``s`` whose parameter count
   fits the budget;
3. if that would need ``s < min_width`` (default 0.5), fix ``s = min_width`` and
   drop layers instead: the largest number of layers that fits.
"""

from __future__ import annotations

from torch import nn

from .params import budget_of, default_hidden_divisor, target_parameters
from .target import Target


def _round_down(value: float, divisor: int) -> int:
    return max(divisor, int(value) // divisor * divisor)


def target_for_budget(
    model: nn.Module,
    params: float,
    hidden_divisor: int | None = None,
    ffn_divisor: int | None = None,
    min_width: float = 0.5,
) -> Target:
    """Pick a :class:`Target` whose parameter count fits a budget (rule in the module docstring).

    Args:
        model: the model to prune.
        params: a fraction of the current count if ``<= 1`` (e.g. ``0.5``), else an absolute count.
        hidden_divisor: hidden_size stays a multiple of this (default:
            :func:`~minitron.pruning.params.default_hidden_divisor`).
        ffn_divisor: intermediate_size stays a multiple of this (default: 2x hidden_divisor).
        min_width: smallest width factor before depth is pruned instead.
    Returns:
        The chosen target.

    Example:
        >>> target_for_budget(model, 0.5)
        Target(hidden_size=..., intermediate_size=..., num_attention_heads=None, num_hidden_layers=None)
    """
    config = model.config
    budget = budget_of(model, params)
    hidden_divisor = hidden_divisor or default_hidden_divisor(config)
    ffn_divisor = ffn_divisor or 2 * hidden_divisor

    def width_target(s: float, layers: int | None = None) -> Target:
        return Target(
            hidden_size=min(config.hidden_size, _round_down(config.hidden_size * s, hidden_divisor)),
            intermediate_size=min(config.intermediate_size, _round_down(config.intermediate_size * s, ffn_divisor)),
            num_hidden_layers=layers,
        )

    def fits(target: Target) -> bool:
        return target_parameters(model, target) <= budget

    # parameter count grows monotonically with s and with layers: binary search both
    grid = [min_width + (1 - min_width) * i / 256 for i in range(257)]  # ascending width factors
    if fits(width_target(grid[0])):
        lo, hi = 0, len(grid) - 1  # invariant: grid[lo] fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(width_target(grid[mid])) else (lo, mid - 1)
        return width_target(grid[lo])
    lo, hi = 0, config.num_hidden_layers - 1  # layers; 0 means "nothing fits"
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(width_target(min_width, mid)) else (lo, mid - 1)
    if lo >= 1:
        return width_target(min_width, lo)
    raise ValueError(
        f"params={params}: infeasible budget of {budget:.0f} parameters; even 1 layer at width {min_width} "
        f"has {target_parameters(model, width_target(min_width, 1))}. Raise the budget or lower min_width"
    )
