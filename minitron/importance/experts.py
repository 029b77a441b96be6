"""Mixture-of-experts calibration: the routed experts' forward with a per-expert statistics callback.

transformers (>= 5) stores a sparse layer's experts as fused 3-D tensors inside one module and runs
them in one ``forward(hidden_states, top_k_index, top_k_weights)``: no per-expert ``Linear`` exists
to hook. :func:`routed_experts_forward` is that forward written out (transformers' eager
implementation: per hit expert, ``down(act(gate(x)) * up(x)) * w`` added to the routed tokens), with
``on_expert(e, token_idx, weight, act, out)`` called for every expert that received tokens:

- ``token_idx`` (n,) rows of the flattened (B*S, D) batch routed to expert ``e``,
- ``weight`` (n,) their routing weights,
- ``act`` (n, F) the expert's down-projection input (its neurons' activations),
- ``out`` (n, D) the expert's output before the routing weight.

:class:`minitron.importance.hooks.CalibrationHooks` installs it on every sparse layer during
calibration (and removes it after); ``tests/test_moe.py`` checks it equals the model's own forward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

ExpertCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def routed_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor, on_expert: Optional[ExpertCallback] = None) -> torch.Tensor:
    """The experts module's output for routed tokens, calling ``on_expert`` per expert that got tokens.

    Args:
        experts: a transformers experts module (``gate_up_proj`` (E, 2F, D), ``down_proj`` (E, D, F), ``act_fn``).
        hidden_states: (N, D) flattened tokens.
        top_k_index: (N, k) expert ids per token.
        top_k_weights: (N, k) routing weights.
        on_expert: statistics callback, see the module docstring.
    Returns:
        (N, D) sum over each token's experts of ``weight * expert(x)``.
    Example:
        >>> out = routed_experts_forward(layer.mlp.experts, x, idx, w)  # == layer.mlp.experts(x, idx, w)
    """
    n_experts = experts.gate_up_proj.shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=n_experts + 1).permute(2, 1, 0)  # (E+1, k, N)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == n_experts:  # the padding id some routers use for dropped tokens
            continue
        top_k_pos, token_idx = torch.where(mask[e])
        gate, up = F.linear(hidden_states[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
        act = experts.act_fn(gate) * up  # (n, F)
        out = F.linear(act, experts.down_proj[e])  # (n, D)
        weight = top_k_weights[token_idx, top_k_pos]  # (n,)
        if on_expert is not None:
            on_expert(e, token_idx, weight, act, out)
        final.index_add_(0, token_idx, (out * weight[:, None]).to(final.dtype))
    return final
