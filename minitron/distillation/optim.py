"""Optimizer and learning-rate schedule of a distillation run: AdamW, linear warmup, cosine decay."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from minitron.distillation.config import DistillConfig


class CosineSchedule:
    """LR multiplier after ``step`` optimizer steps: linear warmup to 1, cosine down to ``min_lr / lr``.

    The cosine runs from ``warmup`` to ``horizon`` (``steps`` unless a time budget re-plans it, see
    :meth:`plan`) and stays at the floor after it. Only numbers live in ``__dict__``: ``LambdaLR``
    saves that dict in its state, so a resumed run gets the same horizon (and checkpoints stay
    loadable with ``torch.load(weights_only=True)``).

    Args:
        cfg: the run's config (``lr``, ``min_lr``, ``warmup_steps``, ``steps``).
    Example:
        >>> s = CosineSchedule(DistillConfig(steps=10, warmup_steps=0, lr=1.0, min_lr=0.1))
        >>> round(s(0), 3), round(s(10), 3)
        (1.0, 0.1)
    """

    def __init__(self, cfg: DistillConfig) -> None:
        self.floor = cfg.min_lr / cfg.lr
        self.warmup = cfg.warmup_steps
        self.horizon = cfg.steps
        self.planned = False  # set once by a time budget; never re-planned (resume keeps it)

    def plan(self, horizon: int) -> None:
        """Lay the cosine out over ``horizon`` steps (at least one step past warmup), once per run."""
        self.horizon = max(int(horizon), self.warmup + 1)
        self.planned = True

    def __call__(self, step: int) -> float:  # step = optimizer steps done so far
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        decay = max(1, self.horizon - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(cfg: DistillConfig) -> CosineSchedule:
    """The schedule of ``cfg`` laid out over ``cfg.steps`` (see :class:`CosineSchedule`)."""
    return CosineSchedule(cfg)


def param_groups(params: Sequence[tuple[str, nn.Parameter]], wd: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: DistillConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
