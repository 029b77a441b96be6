"""Optimizer and learning-rate schedule of a distillation run: AdamW, linear warmup, cosine decay."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from minitron.distillation.config import DistillConfig


def lr_lambda(cfg: DistillConfig) -> Callable[[int], float]:
    """LR multiplier after ``step`` optimizer steps: warmup to 1, cosine down to ``min_lr / lr``."""
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:  # step = optimizer steps done so far
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        decay = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(params: Sequence[tuple[str, nn.Parameter]], wd: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: Sequence[tuple[str, nn.Parameter]], cfg: DistillConfig
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
