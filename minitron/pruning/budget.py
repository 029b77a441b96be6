"""The shape behind ``prune(params=...)``, chosen by measurement.

A parameter budget can be met by many shapes. :func:`choose_budget_target` lists candidates
along the hidden / FFN trade-off (the axes that measured best per parameter removed on
SmolLM2-135M, see ``benchmarks/results/prune_quality_real.md``): ``hidden_size`` at each of
``hidden_fractions`` of its size, and for each the largest ``intermediate_size`` that fits the
budget. Every candidate is pruned from the same importance scores and scored by its LM loss on a
few calibration blocks right after pruning (as the architecture search ranks before
retraining); the lowest loss wins. Cost: one prune and ``len(blocks) / batch_size`` forwards per
candidate.

Without calibration data, :func:`minitron.pruning.sizing.target_for_budget` (hidden and FFN scaled by
the same factor) is the fallback.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ..evaluation import lm_loss
from ..heap import trim_heap
from ..importance.collect import ImportanceScores
from .apply import apply_plan
from .masked_eval import masked_plan
from .params import budget_of, default_hidden_divisor, target_parameters
from .plan import make_plan
from .target import Target

logger = logging.getLogger(__name__)

HIDDEN_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclass
class BudgetCandidate:
    """One shape that fits the budget and its calibration loss right after pruning (``None`` until measured)."""

    target: Target
    params: int
    loss: float | None = None

    def as_dict(self) -> dict:
        return {"target": asdict(self.target), "params": self.params, "loss": self.loss}


def _largest_fitting(model: nn.Module, budget: float, make: Callable[[int], Target], sizes: list[int]) -> Target | None:
    """The target ``make(size)`` with the largest of the ascending ``sizes`` that fits ``budget`` (binary search)."""
    if not sizes or target_parameters(model, make(sizes[0])) > budget:
        return None
    lo, hi = 0, len(sizes) - 1  # invariant: sizes[lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if target_parameters(model, make(sizes[mid])) <= budget else (lo, mid - 1)
    return make(sizes[lo])


def _accepted(config, target: Target) -> bool:
    try:
        target.validate(config)
    except ValueError:
        return False
    return True


def budget_candidates(
    model: nn.Module,
    params: float,
    hidden_fractions: Sequence[float] = HIDDEN_FRACTIONS,
    hidden_divisor: int | None = None,
    ffn_divisor: int | None = None,
    num_attention_heads: int | None = None,
    num_hidden_layers: int | None = None,
) -> list[BudgetCandidate]:
    """Shapes within the budget: for each hidden size, the largest FFN that fits.

    Args:
        model: the model to prune.
        params: a fraction of its parameters (``<= 1``) or an absolute count.
        hidden_fractions: hidden sizes tried, as fractions of the current one (rounded down to
            ``hidden_divisor``).
        hidden_divisor: hidden_size stays a multiple of this (default: lcm of the head count and
            64 for hidden >= 1024, else 8, as :func:`minitron.pruning.sizing.target_for_budget`).
        ffn_divisor: intermediate_size stays a multiple of this (default: 2x hidden_divisor).
        num_attention_heads / num_hidden_layers: prune these axes too, to the given size, in every
            candidate (default: kept).
    Returns:
        The candidates, largest hidden first; hidden sizes the config class rejects, or where no
        FFN fits, are left out.

    Example:
        >>> [c.target.hidden_size for c in budget_candidates(model, 0.5)]
        [576, 504, 432, 360, 288]
    """
    config = model.config
    budget = budget_of(model, params)
    hidden_divisor = hidden_divisor or default_hidden_divisor(config)
    ffn_divisor = ffn_divisor or 2 * hidden_divisor
    hidden_sizes = sorted({min(config.hidden_size, max(hidden_divisor, int(config.hidden_size * f) // hidden_divisor
                                                       * hidden_divisor)) for f in hidden_fractions}, reverse=True)
    ffn_sizes = list(range(ffn_divisor, config.intermediate_size + 1, ffn_divisor))
    if config.intermediate_size not in ffn_sizes:
        ffn_sizes.append(config.intermediate_size)
    out = []
    for hidden in hidden_sizes:
        def make(ffn: int, hidden: int = hidden) -> Target:
            return Target(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=num_attention_heads,
                          num_hidden_layers=num_hidden_layers)

        if not _accepted(config, make(config.intermediate_size)):  # e.g. Llama needs hidden % heads == 0
            continue
        target = _largest_fitting(model, budget, make, ffn_sizes)
        if target is not None:
            out.append(BudgetCandidate(target, target_parameters(model, target)))
    if not out:
        raise ValueError(f"params={params}: no hidden size in {hidden_sizes} has an FFN width that fits "
                         f"{budget:.0f} parameters; raise the budget or allow smaller hidden_fractions")
    return out


@torch.no_grad()
def choose_budget_target(
    model: nn.Module,
    params: float,
    scores: ImportanceScores,
    blocks: torch.Tensor,
    *,
    hidden_fractions: Sequence[float] = HIDDEN_FRACTIONS,
    hidden_divisor: int | None = None,
    ffn_divisor: int | None = None,
    num_attention_heads: int | None = None,
    num_hidden_layers: int | None = None,
    batch_size: int = 8,
    plan_options: dict | None = None,
    masked: bool = True,
    progress: bool = False,
) -> tuple[Target, list[BudgetCandidate]]:
    """Pick the budget shape with the lowest calibration loss right after pruning.

    Args:
        model: the model to prune (left unchanged).
        params: a fraction of its parameters (``<= 1``) or an absolute count.
        scores: importance statistics of ``model``.
        blocks: LongTensor (n, S) of calibration ids scoring each candidate (a few blocks suffice).
        hidden_fractions / hidden_divisor / ffn_divisor / num_attention_heads / num_hidden_layers:
            the candidates (:func:`budget_candidates`).
        batch_size: blocks per forward.
        plan_options: keyword arguments of :func:`minitron.pruning.make_plan` (criteria, norm rescale).
        masked: score each candidate on ``model`` itself under :func:`minitron.pruning.masked_eval.masked_plan`
            (default: the same loss with no pruned copy, so the peak stays at the model plus
            activations; a copy per candidate would add ~``params`` x the model's bytes to the
            peak of ``prune()``, in place or not). ``False`` scores pruned copies (narrower forwards).
        progress: log one line per candidate at INFO (else DEBUG).
    Returns:
        ``(target, candidates)``, every candidate with its loss.

    Example:
        >>> target, table = choose_budget_target(model, 0.5, scores, calib_blocks[:8])
    """
    candidates = budget_candidates(model, params, hidden_fractions, hidden_divisor, ffn_divisor, num_attention_heads,
                                   num_hidden_layers)
    for c in candidates:
        plan = make_plan(scores, c.target, model.config, **(plan_options or {}))
        if masked and (plan.layers is None and not plan.kv_groups and not (plan.head_residual and plan.heads)):
            with masked_plan(model, plan):
                c.loss = lm_loss(model, blocks, batch_size)
        else:
            c.loss = lm_loss(apply_plan(model, plan), blocks, batch_size)
        trim_heap()  # each candidate starts from the live memory, not the previous one's freed tiles
        logger.log(logging.INFO if progress else logging.DEBUG, "  params=%s: hidden %d, FFN %d: calibration loss %.4f",
                   params, c.target.hidden_size, c.target.intermediate_size, c.loss)
    best = min(candidates, key=lambda c: c.loss)
    logger.info("params=%s: measured %d shapes, chose %s", params, len(candidates), best.target)
    return best.target, candidates
