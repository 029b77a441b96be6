"""Models dispatched by accelerate (``device_map`` with CPU/disk offload): detect, onload, refuse.

``from_pretrained(..., device_map="auto", max_memory=..., offload_folder=...)`` leaves the weights
that do not fit on the ``meta`` device and attaches an ``AlignDevicesHook`` (``module._hf_hook``) to
each module: the hook copies the module's weights to its ``execution_device`` just before the
module's ``forward`` and drops them after. Anything that reads a weight *outside* that forward
(the ``lm_head`` in a chunked loss, ``o_proj`` for per-head output norms, fused MoE expert tensors,
a finite-weights check) sees an empty ``meta`` tensor. This module gives those places:

- :func:`offloaded_modules` / :func:`refuse_offloaded`: which modules are offloaded, and the
  one-line refusal of operations that rewrite weights (``prune``, ``search``);
- :func:`execution_device`: the device a model or module computes on, taken from the hooks
  (``_hf_hook.execution_device``, ``hf_device_map``), never from a ``meta`` parameter;
- :func:`onloaded`: the module's weights materialised for the duration of a block (accelerate's
  ``align_module_device``), so code outside ``forward`` reads the real values.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["check_loadable", "execution_device", "execution_devices", "is_offloaded", "offloaded_modules", "onloaded",
           "refuse_offloaded"]


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def _module_offloaded(module: nn.Module) -> bool:
    """True when ``module``'s own weights are not in memory (an offloading hook, or a ``meta`` parameter)."""
    hook = _hook(module)
    if hook is not None and getattr(hook, "offload", False):
        return True
    return any(p.is_meta for p in module.parameters(recurse=False))


def offloaded_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose own weights are offloaded (accelerate hook with ``offload``) or on ``meta``.

    Args:
        model: any module.
    Returns:
        Dotted module names (``""`` for the root), in ``named_modules`` order; empty for an in-memory model.
    Example:
        >>> offloaded_modules(AutoModelForCausalLM.from_pretrained(d, device_map="auto", max_memory={}))[:2]
        ['model.embed_tokens', 'model.layers.0.self_attn.q_proj']
    """
    return [name for name, module in model.named_modules() if _module_offloaded(module)]


def is_offloaded(model: nn.Module) -> bool:
    """True when any weight of ``model`` is offloaded or on ``meta`` (see :func:`offloaded_modules`)."""
    return any(_module_offloaded(m) for m in model.modules())


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """Raise a one-line ``ValueError`` if ``model`` has offloaded weights: ``what`` cannot rewrite them.

    Args:
        model: the model passed to ``what``.
        what: the operation, e.g. ``"minitron.prune"``.
    Raises:
        ValueError: naming the offloaded modules and the supported path (:func:`minitron.prune_checkpoint`).
    """
    names = offloaded_modules(model)
    if not names:
        return
    shown = ", ".join(n or "<root>" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ValueError(
        f"{what}: the model has {len(names)} offloaded modules ({shown}: accelerate device_map offload to cpu/disk "
        "or meta weights), whose weights cannot be pruned in memory; prune its checkpoint folder layer by layer with "
        "minitron.prune_checkpoint(src_dir, dst_dir, calib_data, target) (CLI: minitron prune --model DIR --stream), "
        "optionally with scores=minitron.collect_importance(model, blocks) from this model")


def check_loadable(model: nn.Module, what: str) -> None:
    """Raise a one-line ``ValueError`` if a weight of ``model`` is on ``meta`` with no offload hook to fetch it.

    Such a weight has no data anywhere (a ``meta`` skeleton, ``init_empty_weights``): a forward would fail
    deep inside torch. Offloaded weights (accelerate hook with ``offload``) are fine.

    Args:
        model: the model passed to ``what``.
        what: the operation, e.g. ``"minitron.collect_importance"``.
    """
    for name, module in model.named_modules():
        hook = _hook(module)
        if hook is not None and getattr(hook, "offload", False):
            continue
        meta = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        if meta:
            full = f"{name}.{meta[0]}" if name else meta[0]
            raise ValueError(f"{what}: weight {full} is on the meta device with no offload hook (no data); load "
                             "the model with its weights, or use minitron.prune_checkpoint on its checkpoint folder")


def execution_device(model: nn.Module) -> torch.device:
    """The device ``model`` (or one module) computes on.

    Order: the module's own accelerate hook (``_hf_hook.execution_device``), the first hooked
    submodule's execution device (a dispatched model: the embedding's), the device of its first
    non-``meta`` parameter or buffer, CPU.

    Args:
        model: a model or module, possibly dispatched with accelerate.
    Returns:
        A ``torch.device`` (never ``meta``).
    Example:
        >>> batch = blocks[:8].to(execution_device(model))
    """
    def hook_device(module: nn.Module) -> torch.device | None:
        dev = getattr(_hook(module), "execution_device", None)
        if dev is None:
            return None
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)

    own = hook_device(model)
    if own is not None:
        return own
    hooked = execution_devices(model)
    if hooked:
        return hooked[0]
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")


def execution_devices(model: nn.Module) -> list[torch.device]:
    """The distinct execution devices of ``model``'s accelerate hooks, in module order (empty: no hooks).

    Args:
        model: a model, possibly dispatched with accelerate.
    Returns:
        Devices, first-seen first.
    """
    out: list[torch.device] = []
    for module in model.modules():
        dev = getattr(_hook(module), "execution_device", None)
        if dev is None:
            continue
        dev = torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
        if dev not in out:
            out.append(dev)
    return out


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Materialise ``module``'s own (non-recursive) offloaded weights for the block; a no-op otherwise.

    Args:
        module: a module whose weights are read outside its ``forward`` (``lm_head``, ``o_proj``, experts).
    Yields:
        ``module``, its ``.weight`` (etc.) real tensors on its execution device inside the block.
    Raises:
        ValueError: a parameter is on ``meta`` with no accelerate hook to fetch it (no data exists).
    Example:
        >>> with onloaded(model.lm_head) as head:
        ...     logits = hidden @ head.weight.T
    """
    hook = _hook(module)
    if hook is not None and getattr(hook, "offload", False):
        from accelerate.utils import align_module_device

        with align_module_device(module):
            yield module
        return
    meta = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
    if meta:
        raise ValueError(f"{type(module).__name__}.{meta[0]} is on the meta device with no offload hook to load it "
                         "from (no data); load the model with its weights, or use minitron.prune_checkpoint on its "
                         "checkpoint folder")
    yield module
