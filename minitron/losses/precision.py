"""How the fused losses meet autocast: GEMM inputs in the autocast dtype, logits and statistics in fp32.

Under ``torch.autocast`` the logits GEMMs would return logits rounded to the autocast dtype (bf16 logits
cost 4-23% gradient error in fused KD losses, Liger-Kernel issue 1432) and the in-place gradient GEMMs
would mix dtypes. The losses instead cast their four GEMM operands the way autocast would and run with
autocast off, so every GEMM takes bf16/fp16 inputs and accumulates and returns fp32.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)

GEMM_OPERANDS = 4  # (student hidden, student weight, teacher hidden, teacher weight)


def outside_autocast(fn: F, operands: int = GEMM_OPERANDS) -> F:
    """Decorate a loss whose first ``operands`` parameters are its GEMM operands: under autocast, run it with
    those cast to the autocast dtype and autocast off; otherwise call it as it is.

    Args:
        fn: the loss function.
        operands: how many leading parameters are GEMM operands (4: student and teacher hidden states and
            weights; 2 for a cached teacher: ``functools.partial(outside_autocast, operands=2)``).
    Returns:
        The wrapped function (same signature and docstring).
    Example:
        >>> @outside_autocast
        ... def loss(hs, ws, ht, wt, *, temperature=1.0): ...
    """
    names = list(inspect.signature(fn).parameters)[:operands]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = args[0] if args else kwargs[names[0]]
        device = first.device.type
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        amp = torch.get_autocast_dtype(device)
        args = tuple(a.to(amp) if i < operands else a for i, a in enumerate(args))
        kwargs = {k: v.to(amp) if k in names else v for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
