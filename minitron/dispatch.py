"""Which implementation of a kernel runs: the Triton kernel or its pure-PyTorch reference.

Every Triton kernel of ``minitron_kernels`` has a pure-PyTorch reference (``fused_kl`` ->
``minitron.losses.kd.reference``, ``importance`` / ``importance_reference``). :class:`Dispatch` names one
such pair and :meth:`Dispatch.select` picks one for a requested ``impl`` and a device:

* ``auto``: Triton for CUDA tensors when triton imports, else the reference;
* ``triton``: the kernel; on a CPU device only under the Triton interpreter (``TRITON_INTERPRET=1``),
  otherwise a ValueError naming the fix; an ImportError without the triton package;
* a reference name (``reference``, or ``chunked`` / ``naive`` for the KD loss): the reference.

``select`` returns a :class:`Choice` whose ``name`` is the path that runs, which callers report
(``accumulate_`` returns it; ``linear_kd_loss`` sets it on the loss) and pass to the registered op as
``use_triton`` (``torch.ops.minitron.importance_accumulate_`` / ``block_cos_sum_`` / ``kd_chunk``: one
entry point per kernel, see docs/architecture.md "Registered ops"). The native C++/CUDA op
``torch.ops.minitron.compact_`` needs no choice here: the torch dispatcher picks its CPU or CUDA
kernel, and its pure-PyTorch implementation otherwise (see :mod:`minitron.ops`).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Choice", "Dispatch", "check_impl_device", "interpreter_on"]


def interpreter_on() -> bool:
    """Whether Triton kernels run on the CPU in interpreter mode (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_impl_device(impl: str, device: torch.device | str, name: str = "impl", fallback: str = "reference") -> None:
    """Raise if ``impl="triton"`` cannot run on ``device`` (no CUDA GPU and no Triton interpreter).

    Args:
        impl: the requested implementation.
        device: where the op runs.
        name: how the caller names the option, for the message (``impl``, ``loss_impl``).
        fallback: the reference ``impl`` the message suggests.
    """
    dev = torch.device(device)
    if impl == "triton" and dev.type != "cuda" and not interpreter_on():
        raise ValueError(f"{name}='triton' needs a CUDA GPU (this runs on {dev.type}); use "
                         f"{name}='auto' or '{fallback}'")


@dataclass(frozen=True)
class Choice:
    """The selected path: ``name`` (``triton`` or a reference name) and the function that runs it."""

    name: str
    fn: Callable[..., Any]


@dataclass(frozen=True)
class Dispatch:
    """A Triton kernel and its pure-PyTorch reference.

    Args:
        kernel: ``"module:function"`` of the Triton kernel (imported on first use: triton is optional).
        reference: the reference function (always available).
        reference_names: the ``impl`` values that select the reference; the first is ``auto``'s fallback.
    Example:
        >>> d = Dispatch("minitron_kernels.importance:accumulate_triton", accumulate_reference)
        >>> d.select("auto", torch.device("cpu")).name
        'reference'
    """

    kernel: str
    reference: Callable[..., Any]
    reference_names: tuple[str, ...] = ("reference",)

    @property
    def impls(self) -> tuple[str, ...]:
        return ("auto", "triton", *self.reference_names)

    def triton_fn(self) -> Callable[..., Any] | None:
        """The Triton kernel, or None when triton is not installed."""
        module, fn = self.kernel.split(":")
        try:
            return getattr(importlib.import_module(module), fn)
        except ImportError:
            return None

    def select(self, impl: str, device: torch.device | str, *, name: str = "impl") -> Choice:
        """The path for ``impl`` on ``device`` (see the module docstring)."""
        if impl not in self.impls:
            raise ValueError(f"unknown {name}={impl!r}; allowed values: {', '.join(self.impls)}")
        check_impl_device(impl, device, name=name, fallback=self.reference_names[0])
        if impl == "auto":
            fn = self.triton_fn() if torch.device(device).type == "cuda" else None
            return Choice("triton", fn) if fn is not None else Choice(self.reference_names[0], self.reference)
        if impl == "triton":
            fn = self.triton_fn()
            if fn is None:
                raise ImportError(f"{name}='triton' needs the triton package (pip install triton)")
            return Choice("triton", fn)
        return Choice(impl, self.reference)
