"""Run the unpruned model as if a plan had been applied: exact, with no pruned copy in memory.

Measuring a candidate shape (``prune(params=...)`` scores several) by building its pruned copy
costs the copy's memory on top of the model: ~1.5x at ``params=0.5``, which would break the ~1x
peak of ``prune(..., inplace=True)``. :func:`masked_plan` instead installs forward hooks that make
the original model compute exactly what the pruned one would:

- hidden channels: the residual stream is kept at full width ``D`` with the dropped channels at
  exactly zero (the embedding output and every ``o_proj`` / ``down_proj`` output are masked).
  Projections that read the stream then see zeros where the pruned model has no column, so their
  outputs are the pruned ones. Norms are the one place where width matters: an RMSNorm over the
  ``K`` kept channels divides by ``sqrt(sum_k x_k^2 / K + eps)``, which the hook recomputes from
  the full-width input (its dropped entries are zero), times the kept weight and the plan's
  ``norm_scale``; a LayerNorm centres and normalises over the kept channels the same way.
- MLP neurons: the input of ``down_proj`` is masked (a dropped neuron contributes nothing).
- query heads (without the head residual): the input of ``o_proj`` is masked per head.

Layer removal, KV-group removal and the head-residual fold are not emulated (:func:`masked_plan`
raises); ``prune(params=...)`` candidates use hidden and FFN only. ``tests/test_masked_eval.py``
checks, per family, that the masked model's loss equals the pruned copy's.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..adapters import decoder_layers, get_adapter, head_dim_of
from ..importance.norms import is_rms_norm, norm_eps


def _mask(size: int, keep: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """(size,) 0/1 vector of ``keep`` in the dtype/device of ``like`` (None = keep everything)."""
    if keep is None or keep.numel() == size:
        return None
    mask = torch.zeros(size, dtype=like.dtype, device=like.device)
    mask[keep.to(like.device)] = 1
    return mask


def _norm_over_kept(norm: nn.Module, x: torch.Tensor, mask: torch.Tensor, kept: int, scale: float,
                    offset: float = 0.0) -> torch.Tensor:
    """What the pruned norm outputs, at full width: ``x`` (..., D) has zeros on dropped channels.

    ``offset``: the norm multiplies by ``offset + weight`` (Gemma's ``1 + weight``, computed in fp32
    and rounded once, as Gemma's RMSNorm does); the rescale acts on that sum.
    """
    dtype = x.dtype
    xf = x.float()
    if is_rms_norm(norm):
        variance = xf.square().sum(-1, keepdim=True) / kept  # mean over the K kept channels
        if offset:
            y = xf * torch.rsqrt(variance + norm_eps(norm)) * ((norm.weight.float() + offset) * scale)
            return y.to(dtype) * mask
        y = (xf * torch.rsqrt(variance + norm_eps(norm))).to(dtype)
        return norm.weight * scale * y * mask
    mean = xf.sum(-1, keepdim=True) / kept  # LayerNorm over the kept channels
    centred = (xf - mean) * mask.float()
    variance = centred.square().sum(-1, keepdim=True) / kept
    y = (centred * torch.rsqrt(variance + norm.eps)).to(dtype)
    out = y * norm.weight if norm.weight is not None else y
    if norm.bias is not None:
        out = out + norm.bias
    return out * mask


@contextmanager
def masked_plan(model: nn.Module, plan) -> Iterator[nn.Module]:
    """Make ``model`` compute what ``apply_plan(model, plan)`` would, inside a ``with`` block.

    Args:
        model: a supported causal LM (left unchanged: only hooks are added, and removed on exit).
        plan: a :class:`minitron.pruning.PrunePlan` pruning hidden channels, MLP neurons and/or
            query heads (no layers, KV groups or head residual).
    Returns:
        A context manager yielding ``model``.
    Raises:
        ValueError: the plan removes layers or KV groups, or folds the head residual; or the model is a
            mixture-of-experts model.

    Example:
        >>> with masked_plan(model, plan):
        ...     loss = lm_loss(model, blocks)  # == lm_loss(apply_plan(model, plan), blocks)
    """
    if plan.layers is not None or plan.kv_groups or (plan.head_residual and plan.heads):
        raise ValueError("masked_plan emulates hidden, MLP-neuron and query-head pruning only; "
                         "build the pruned model with apply_plan for layer / KV-group / head-residual plans")
    adapter = get_adapter(model)
    if adapter.moe is not None:
        raise ValueError(f"masked_plan does not emulate mixture-of-experts layers ({type(model).__name__}); "
                         "build the pruned model with apply_plan")
    config = model.config
    embed = model.get_submodule(adapter.embed)
    layers = decoder_layers(model, adapter)
    hidden = _mask(config.hidden_size, plan.hidden, embed.weight)
    kept = int(plan.hidden.numel()) if plan.hidden is not None else config.hidden_size
    handles = []

    # without autograd the fresh projection outputs / inputs are masked in place (no second copy of
    # the activation alive at once); with it, out of place
    def mask_output(mask: torch.Tensor):
        return lambda module, args, out: out * mask if torch.is_grad_enabled() else out.mul_(mask)

    def mask_input(mask: torch.Tensor):
        return lambda module, args: ((args[0] * mask if torch.is_grad_enabled() else args[0].mul_(mask)), *args[1:])

    def norm_hook(mask: torch.Tensor, scale: float):
        return lambda module, args, out: _norm_over_kept(module, args[0], mask, kept, scale, adapter.norm_offset)

    try:
        if hidden is not None:
            handles.append(embed.register_forward_hook(mask_output(hidden)))
            final = model.get_submodule(adapter.final_norm)
            handles.append(final.register_forward_hook(norm_hook(hidden, plan.norm_scale.get("norm.final", 1.0))))
        head_dim = head_dim_of(config)
        for l, layer in enumerate(layers):
            if hidden is not None:
                for k, name in enumerate(adapter.layer_norms):
                    scale = plan.norm_scale.get(f"norm.{l}.{k}", 1.0)
                    handles.append(layer.get_submodule(name).register_forward_hook(norm_hook(hidden, scale)))
                for name in adapter.hidden_out:
                    handles.append(layer.get_submodule(name).register_forward_hook(mask_output(hidden)))
            down = layer.get_submodule(adapter.down_proj)
            neurons = _mask(down.in_features, plan.mlp.get(l), down.weight)
            if neurons is not None:
                handles.append(down.register_forward_pre_hook(mask_input(neurons)))
            o_proj = layer.get_submodule(adapter.o_proj)
            heads = _mask(config.num_attention_heads, plan.heads.get(l), o_proj.weight)
            if heads is not None:  # (n_heads,) -> (n_heads * head_dim,) over o_proj's input
                handles.append(o_proj.register_forward_pre_hook(mask_input(heads.repeat_interleave(head_dim))))
        yield model
    finally:
        for h in handles:
            h.remove()
