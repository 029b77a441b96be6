"""Parameter counting (:func:`count_parameters`) and the parameter-budget rule behind ``prune(params=...)``.

Parameters are counted exactly by instantiating the pruned config on the meta
device (no memory, no compute), so every family's biases, norms and tied
embeddings are counted the way Hugging Face builds them.

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

import math

import torch
from torch import nn

from .pruning.target import Target


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters of ``model`` (tied weights counted once).

    Args:
        model: any module (meta-device models work: only shapes are read).
    Returns:
        The parameter count.
    Example:
        >>> count_parameters(model) / 1e6  # millions
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_config_parameters(model_cls: type[nn.Module], config) -> int:
    """Exact number of distinct parameters of ``model_cls(config)``, counted on the meta device."""
    with torch.device("meta"):
        return count_parameters(model_cls(config))


def target_parameters(model: nn.Module, target: Target) -> int:
    """Parameter count of ``model`` pruned to ``target``."""
    return count_config_parameters(type(model), target.config_for(model.config))


# a count below this fraction of the model is taken for a mistyped fraction or percentage (50 for 50%)
MIN_COUNT_FRACTION = 0.01


def budget_count(params: float, total: int) -> float:
    """The absolute parameter count a ``params`` budget means: a fraction in (0, 1] of ``total``, or a count > 1.

    Args:
        params: the user's budget.
        total: the model's parameter count.
    Returns:
        ``params * total`` for a fraction, else ``params``.
    Raises:
        ValueError: not a positive number, or a value > 1 (read as a count) under 1% of ``total`` or above
            it. The message says how the value was read.
    Example:
        >>> budget_count(0.5, 1000), budget_count(300, 1000)
        (500.0, 300)
    """
    if isinstance(params, bool) or not isinstance(params, (int, float)) or not math.isfinite(params) or params <= 0:
        raise ValueError(f"params={params!r} must be a fraction in (0, 1] of the model's parameters (e.g. 0.5) or "
                         "an absolute parameter count")
    if params <= 1:
        return params * total
    read = f"params={params:g} is read as an absolute parameter count (values > 1 are counts, not fractions)"
    if params < MIN_COUNT_FRACTION * total:
        raise ValueError(f"{read}, under {MIN_COUNT_FRACTION:.0%} of the model's {total:,}; for a fraction of the "
                         "model pass a value in (0, 1] (e.g. 0.5 for half)")
    if params > total:
        raise ValueError(f"{read}, more than the model's {total:,} parameters; pass a smaller count or a fraction "
                         "in (0, 1]")
    return int(params)


def budget_of(model: nn.Module, params: float) -> float:
    """The absolute parameter budget of ``params`` (:func:`budget_count`: a fraction ``<= 1`` of the model's
    count, or a count).

    Raises:
        ValueError: an invalid budget (:func:`budget_count`), or one that leaves the model as large as it is.
    """
    total = target_parameters(model, Target())
    budget = budget_count(params, total)
    if budget >= total:
        raise ValueError(f"params={params} gives a budget of {budget:.0f} >= the model's {total} parameters; nothing to prune")
    return budget


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
        hidden_divisor: hidden_size stays a multiple of this (default: lcm of the head count and
            64 for hidden >= 1024, else 8).
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
    # hidden stays a multiple of the head count too: some config classes (Llama) require it
    hidden_divisor = hidden_divisor or math.lcm(64 if config.hidden_size >= 1024 else 8, config.num_attention_heads)
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
