"""Distillation losses: fused linear (lm_head) + KL divergence (docs/method.md sections 4-5).

:func:`linear_kd_loss` projects student and teacher hidden states through their lm_heads
and returns the forward KL (or reverse KL / generalized JSD) per counted token, without
materialising N x V logits on the ``chunked`` and ``triton`` paths:

========  ==============================================================  =============
impl      what runs                                                       memory
========  ==============================================================  =============
naive     full fp32 logits + plain autograd (the reference)               O(N * V)
chunked   pure PyTorch, chunks of tokens, grads computed in forward       O(chunk * V)
triton    as chunked, softmax/KL/grad-logits in Triton kernels            O(chunk * V)
auto      triton for CUDA inputs when triton imports, else chunked
========  ==============================================================  =============

The path is picked by :mod:`minitron.dispatch`; the loss tensor reports it as ``loss.impl``.

Drop-in loss with Liger's ``LigerFusedLinearJSDLoss`` contract (hard CE + soft KD, labels, padding
masks, ``num_items_in_batch``): :class:`LinearKDLoss` / :func:`fused_linear_kd_loss` in
:mod:`minitron.losses.linear_kd`, built on :func:`linear_kd_loss`.

Other losses: :mod:`minitron.losses.cross_entropy` (chunked next-token CE from hidden states),
:mod:`minitron.losses.intermediate` (intermediate-state loss and its dynamic weight).
"""

from __future__ import annotations

import contextvars
import logging

import torch

from minitron.dispatch import Dispatch
from minitron.dispatch import check_impl_device as _check_impl_device
from minitron.losses.cross_entropy import linear_cross_entropy
from minitron.losses.fused import KDConfig, linear_kd_loss_fused
from minitron.losses.linear_kd import LinearKDLoss, fused_linear_kd_loss
from minitron.losses.precision import outside_autocast
from minitron.losses.intermediate import IntermediateProjections, dynamic_alpha, intermediate_state_loss
from minitron.losses.reference import LOSSES, REDUCTIONS, keep_mask, linear_kd_loss_naive
from minitron_kernels.fused_kl_reference import kd_chunk_reference, loss_kind

__all__ = ["LinearKDLoss", "fused_linear_kd_loss", "linear_kd_loss", "last_impl", "linear_kd_loss_naive", "IMPLS", "check_impl_device", "KD_CHUNK",
           "linear_cross_entropy", "IntermediateProjections", "dynamic_alpha", "intermediate_state_loss"]

#: the chunk op of the chunked / triton paths; ``naive`` is the full-logits reference (no chunk op)
KD_CHUNK = Dispatch("minitron_kernels.fused_kl:kd_chunk_triton", kd_chunk_reference, ("chunked", "naive"))
IMPLS = KD_CHUNK.impls  # ("auto", "triton", "chunked", "naive")
logger = logging.getLogger(__name__)
# the path of this thread's / task's last call, for last_impl() (the loss itself carries it as .impl)
_last_path: contextvars.ContextVar[str] = contextvars.ContextVar("minitron_kd_last_path", default="none")
_LOGGED: set[str] = set()


def last_impl() -> str:
    """Name of the path (``naive`` | ``chunked`` | ``triton``) of this thread's last :func:`linear_kd_loss` call.

    The returned loss also carries it: ``linear_kd_loss(...).impl``.
    """
    return _last_path.get()


def check_impl_device(impl: str, device: torch.device, name: str = "impl") -> None:
    """Raise if ``impl="triton"`` cannot run on ``device`` (no CUDA GPU and no Triton interpreter).

    Args:
        impl: the requested implementation.
        device: where the loss runs.
        name: how the caller names the option, for the message (``impl``, ``loss_impl``).
    """
    _check_impl_device(impl, device, name=name, fallback="chunked")


@outside_autocast
def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int = 1024,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> torch.Tensor:
    """Fused lm_head projection + distillation divergence, averaged over counted tokens.

    Per token (P = teacher, Q = student, softmax of logits / tau), times tau^2:
    ``forward_kl`` KL(P||Q) = sum_v P (log P - log Q); ``reverse_kl`` KL(Q||P);
    ``jsd`` beta KL(P||M) + (1-beta) KL(Q||M), M = beta P + (1-beta) Q (Liger convention:
    beta=0 is forward KL, beta=1 reverse KL). If Vs != Vt the smaller side is padded with
    ``-inf`` logits. Gradients flow to the student inputs only. Under ``torch.autocast`` the hidden
    states and lm_head weights are cast to the autocast dtype (as autocast casts a matmul's inputs)
    and the loss runs with autocast off, so logits and accumulators stay fp32 on every path.

    Args:
        student_hidden: (N, Hs) final hidden states of the student (flatten batch and sequence).
        student_weight: (Vs, Hs) student lm_head weight.
        teacher_hidden: (N, Ht) teacher hidden states (no gradient).
        teacher_weight: (Vt, Ht) teacher lm_head weight (no gradient).
        student_bias, teacher_bias: optional (Vs,) / (Vt,) lm_head biases.
        mask: optional (N,) bool, True = the token counts.
        labels: optional (N,) ints; tokens whose label == ``ignore_index`` are dropped.
        ignore_index: label value to drop.
        loss: ``"forward_kl"`` | ``"reverse_kl"`` | ``"jsd"``.
        beta: JSD mixing coefficient in [0, 1].
        temperature: softmax temperature tau; the loss is scaled by tau^2.
        top_k: if set, divergence over the teacher's top-k tokens only, both sides renormalised.
        reduction: ``"mean"`` over counted tokens (0 if none) | ``"sum"`` | ``"none"`` (N,) fp32.
        impl: ``"auto"`` | ``"triton"`` | ``"chunked"`` | ``"naive"``.
        chunk_size: tokens per chunk for the chunked / triton paths.
        student_softcap, teacher_softcap: final-logit soft-caps (``config.final_logit_softcapping``,
            Gemma 2): each side's logits become ``cap * tanh(logits / cap)`` before the softmax, as
            in the model's own forward; None for none.
    Returns:
        fp32 scalar loss, or (N,) per-token losses for ``reduction="none"`` (0 where masked); its
        attribute ``impl`` names the path that ran (``naive`` | ``chunked`` | ``triton``).
    Example:
        >>> hs = torch.randn(6, 16, requires_grad=True)
        >>> ws = torch.randn(100, 16, requires_grad=True)
        >>> loss = linear_kd_loss(hs, ws, torch.randn(6, 32), torch.randn(100, 32), temperature=1.0)
        >>> loss.backward(); loss.impl
        'chunked'
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss={loss!r}; allowed values: {', '.join(LOSSES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}; allowed values: {', '.join(REDUCTIONS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student has {student_hidden.shape[0]} tokens, teacher {teacher_hidden.shape[0]}")
    choice = KD_CHUNK.select(impl, student_hidden.device)
    name = choice.name
    if not torch.compiler.is_compiling():  # dynamo cannot trace ContextVar.set nor logging (graph breaks)
        _last_path.set(name)
        if name not in _LOGGED:
            _LOGGED.add(name)
            logger.info("linear_kd_loss: using the %s path", name)
    kwargs = dict(loss=loss, beta=beta, temperature=temperature, top_k=top_k, reduction=reduction)
    if name == "naive":
        out = linear_kd_loss_naive(
            student_hidden, student_weight, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, mask=mask, labels=labels,
            ignore_index=ignore_index, student_softcap=student_softcap, teacher_softcap=teacher_softcap, **kwargs,
        )
        out.impl = name
        return out
    keep = None
    if mask is not None or labels is not None:
        keep = keep_mask(student_hidden.shape[0], student_hidden.device, mask, labels, ignore_index)
    cfg = KDConfig(loss_kind(loss, beta), beta, temperature, top_k, reduction, chunk_size, choice.fn,
                   student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    out = linear_kd_loss_fused(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, keep, cfg
    )
    out.impl = name
    return out
