"""Distillation losses: fused linear (lm_head) + KL divergence (docs/method.md sections 4-5) and others.

* :mod:`minitron.losses.kd`: the fused linear + KD op (:func:`linear_kd_loss`, chunked, never N x V
  logits; Triton chunk kernel on CUDA) and the drop-in :class:`LinearKDLoss` /
  :func:`fused_linear_kd_loss` with Liger's ``LigerFusedLinearJSDLoss`` contract.
* :mod:`minitron.losses.cross_entropy`: chunked next-token CE from hidden states.
* :mod:`minitron.losses.intermediate`: intermediate-state loss and its dynamic weight.
* :mod:`minitron.losses.cached`: KD against an offline teacher's cached top-k logits (top-k + tail bucket;
  :mod:`~minitron.losses.cached_chunked` computes it with the gradient in forward,
  :mod:`~minitron.losses.cached_reference` is its autograd reference).
"""

from __future__ import annotations

from minitron.losses.cross_entropy import linear_cross_entropy
from minitron.losses.intermediate import IntermediateProjections, dynamic_alpha, intermediate_state_loss
from minitron.losses.kd import (IMPLS, KD_CHUNK, LinearKDLoss, check_impl_device, fused_linear_kd_loss, last_impl,
                                linear_kd_loss, linear_kd_loss_naive)

__all__ = ["LinearKDLoss", "fused_linear_kd_loss", "linear_kd_loss", "last_impl", "linear_kd_loss_naive", "IMPLS",
           "check_impl_device", "KD_CHUNK", "linear_cross_entropy", "IntermediateProjections", "dynamic_alpha",
           "intermediate_state_loss"]
