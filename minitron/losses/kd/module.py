"""Drop-in fused linear KD loss with Liger's contract: :class:`LinearKDLoss` and :func:`fused_linear_kd_loss`.

The contract is Liger-Kernel's ``LigerFusedLinearJSDLoss``: ``forward(student_input, student_weight,
teacher_input, teacher_weight, true_labels=None, student_bias=None, teacher_bias=None)`` returns

    weight_hard_loss * CE(student, labels) + weight_soft_loss * JSD_beta(teacher, student)

both summed over the counted tokens and divided by their number (or by ``num_items_in_batch``, the
Hugging Face gradient-accumulation count). ``beta`` follows Liger: 0 = forward KL(teacher || student),
1 = reverse KL(student || teacher), in between the generalised JSD; ``temperature`` divides both logits
and, as in Liger, the soft loss is NOT multiplied by tau^2 unless ``tau_squared=True`` (what
:func:`minitron.distill` does).

What runs: the soft term is :func:`minitron.losses.linear_kd_loss` (chunked, fp32 logits, gradients
computed in forward; Triton chunk op on CUDA), the hard term
:func:`minitron.losses.cross_entropy.linear_cross_entropy_sum` (chunked, recomputed in backward). Neither
builds the (N, V) logits: memory is O(chunk_size * V). Beyond Liger: tokens can be dropped by an
``attention_mask`` (padded batches) as well as by ``ignore_index`` labels, top-k KD, final-logit
soft-caps (Gemma 2), and a teacher whose lm_head has more rows than the student's (vocabulary padding)
is cut to the student's vocabulary and renormalised over the shared ids, as :func:`minitron.distill`
does (Liger instead appends zero logits to the student).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from minitron.losses.cross_entropy import linear_cross_entropy_sum
from minitron.losses.kd.api import linear_kd_loss
from minitron.losses.kd.chunked import default_chunk_size
from minitron.losses.precision import outside_autocast

__all__ = ["LinearKDLoss", "fused_linear_kd_loss", "shared_vocab_head"]


def shared_vocab_head(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``vocab`` rows of an lm_head (all of it if it has no more): softmax over them renormalises.

    Args:
        weight: (Vt, H) teacher lm_head weight.
        bias: optional (Vt,) bias.
        vocab: the student's vocabulary size Vs.
    Returns:
        ``(weight[:Vs], bias[:Vs])`` views when Vt > Vs, else the inputs unchanged.
    Example:
        >>> shared_vocab_head(torch.randn(10, 4), None, 8)[0].shape
        torch.Size([8, 4])
    """
    if weight.shape[0] <= vocab:
        return weight, bias
    return weight[:vocab], None if bias is None else bias[:vocab]


def _flat(x: torch.Tensor, name: str, weight: torch.Tensor, weight_name: str) -> torch.Tensor:
    """(..., H) -> (N, H), checking H against the lm_head weight (V, H)."""
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must be a (vocab, hidden) matrix, got shape {tuple(weight.shape)}")
    if x.dim() < 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name} has hidden size {x.shape[-1] if x.dim() else None} (shape {tuple(x.shape)}) but "
                         f"{weight_name} is {tuple(weight.shape)}: pass the final hidden states of the model whose "
                         f"lm_head weight this is, shaped (N, H) or (B, S, H)")
    return x.reshape(-1, x.shape[-1])


def _per_token(x: torch.Tensor | None, name: str, n: int) -> torch.Tensor | None:
    """(B, S) or (N,) per-token tensor -> (N,), checking it has one entry per token."""
    if x is None:
        return None
    if x.numel() != n:
        raise ValueError(f"{name} has {x.numel()} entries (shape {tuple(x.shape)}) but there are {n} tokens: "
                         f"pass one per hidden state, shaped (N,) or (B, S) like the inputs (shift labels first)")
    return x.reshape(-1)


def _check_options(weight_hard_loss: float, weight_soft_loss: float, beta: float, temperature: float,
                   top_k: int | None, chunk_size: int | None) -> None:
    for name, v in (("weight_hard_loss", weight_hard_loss), ("weight_soft_loss", weight_soft_loss)):
        if not isinstance(v, numbers.Real) or not v >= 0:
            raise ValueError(f"{name}={v!r} must be a number >= 0")
    if not isinstance(beta, numbers.Real) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must lie in [0, 1] (0 = forward KL, 1 = reverse KL, between = JSD)")
    if not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 or None")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1, or None for the default")


@outside_autocast
def fused_linear_kd_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    true_labels: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    weight_hard_loss: float = 0.5,
    weight_soft_loss: float = 0.5,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    top_k: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    tau_squared: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
    return_soft_hard_loss: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional form of :class:`LinearKDLoss` (Liger ``LigerFusedLinearJSDLoss`` contract, see the module doc).

    Args:
        student_input: (N, Hs) or (B, S, Hs) final (normed) hidden states of the student.
        student_weight: (Vs, Hs) student lm_head weight.
        teacher_input: (N, Ht) or (B, S, Ht) teacher hidden states (no gradient).
        teacher_weight: (Vt, Ht) teacher lm_head weight (no gradient); rows beyond Vs are dropped.
        true_labels: optional (N,) / (B, S) target ids aligned with the inputs (already shifted);
            ``ignore_index`` tokens count in neither term. Needed when ``weight_hard_loss > 0``.
        student_bias, teacher_bias: optional (Vs,) / (Vt,) lm_head biases.
        weight_hard_loss: weight of the cross-entropy on ``true_labels``.
        weight_soft_loss: weight of the distillation divergence.
        beta: 0 forward KL, 1 reverse KL, between the generalised JSD (Liger's definition).
        temperature: divides student and teacher logits of the soft term (not of the CE).
        ignore_index: label value of tokens that do not count.
        top_k: if set, the divergence over the teacher's top-k ids only, both sides renormalised.
        num_items_in_batch: divide the summed losses by this count (Hugging Face's number of counted
            tokens over all gradient-accumulation micro-batches) instead of this call's count.
        attention_mask: optional (N,) / (B, S); tokens where it is 0 do not count (padding).
        student_softcap, teacher_softcap: final-logit soft-caps ``cap * tanh(logits / cap)`` (Gemma 2).
        tau_squared: multiply the soft term by temperature^2 (Hinton; :func:`minitron.distill` does).
        chunk_size: tokens per chunk (memory O(chunk_size * V)); None: sized by the vocabulary
            (:func:`minitron.losses.kd.chunked.default_chunk_size`, 1024 at V = 49152).
        impl: ``"auto"`` | ``"triton"`` | ``"chunked"`` | ``"naive"`` path of the soft term.
        return_soft_hard_loss: also return the two weighted-before terms ``(loss, soft, hard)``.
    Returns:
        fp32 scalar loss (0 when no token counts), or ``(loss, soft_loss, hard_loss)``.
    Example:
        >>> hs, ws = torch.randn(6, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
        >>> labels = torch.tensor([3, 7, -100, 1, 2, -100])
        >>> loss = fused_linear_kd_loss(hs, ws, torch.randn(6, 32), torch.randn(100, 32), labels, beta=0.0)
        >>> loss.backward()
    """
    _check_options(weight_hard_loss, weight_soft_loss, beta, temperature, top_k, chunk_size)
    hs = _flat(student_input, "student_input", student_weight, "student_weight")  # (N, Hs)
    ht = _flat(teacher_input, "teacher_input", teacher_weight, "teacher_weight")  # (N, Ht)
    n = hs.shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(max(student_weight.shape[0], teacher_weight.shape[0]), hs.device)
    if ht.shape[0] != n:
        raise ValueError(f"student_input has {n} tokens but teacher_input {ht.shape[0]}: run both models on the same "
                         f"batch and flatten them the same way")
    labels = _per_token(true_labels, "true_labels", n)  # (N,)
    mask = _per_token(attention_mask, "attention_mask", n)  # (N,)
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise ValueError(f"true_labels must be integer token ids, got dtype {labels.dtype}")
    if weight_hard_loss > 0 and labels is None:
        raise ValueError(f"weight_hard_loss={weight_hard_loss} needs true_labels for the cross-entropy; pass the "
                         "(shifted) labels or set weight_hard_loss=0")
    if isinstance(num_items_in_batch, numbers.Real) and not num_items_in_batch > 0:
        raise ValueError(f"num_items_in_batch={num_items_in_batch!r} must be > 0 (the number of counted tokens)")
    if mask is not None and labels is not None:  # padding drops a token from both terms
        labels = labels.masked_fill(mask.to(device=labels.device) == 0, ignore_index)
        mask = None
    # the one divisor of both terms: HF's accumulated count, else the tokens this call counts
    if num_items_in_batch is not None:
        denom = num_items_in_batch
    elif labels is not None:
        denom = (labels != ignore_index).sum().clamp_min(1)
    elif mask is not None:
        denom = (mask != 0).sum().clamp_min(1)
    else:
        denom = max(n, 1)
    zero = hs.new_zeros((), dtype=torch.float32)
    soft = hard = zero
    if weight_soft_loss > 0 or return_soft_hard_loss:
        wt, bt = shared_vocab_head(teacher_weight, teacher_bias, student_weight.shape[0])  # (Vs, Ht) when Vt > Vs
        total = linear_kd_loss(  # summed over the counted tokens, fp32; tau^2-scaled
            hs, student_weight, ht, wt, student_bias=student_bias, teacher_bias=bt,
            mask=None if mask is None else mask != 0, labels=labels, ignore_index=ignore_index, loss="jsd", beta=beta,
            temperature=temperature, top_k=top_k, reduction="sum", impl=impl, chunk_size=chunk_size,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        )
        soft = total / denom if tau_squared else total / (denom * (temperature * temperature))
    if weight_hard_loss > 0 or (return_soft_hard_loss and labels is not None):
        hard = linear_cross_entropy_sum(hs, student_weight, labels, student_bias, ignore_index, chunk_size,
                                        softcap=student_softcap) / denom
    loss = weight_hard_loss * hard + weight_soft_loss * soft
    return (loss, soft, hard) if return_soft_hard_loss else loss


class LinearKDLoss(nn.Module):
    """Fused lm_head + distillation loss, a drop-in for Liger's ``LigerFusedLinearJSDLoss``.

    Same constructor options and ``forward`` signature as Liger (``compiled`` is not taken: the
    loss runs its own chunk loop), plus ``top_k``, soft-caps, ``tau_squared``, ``impl``, and the
    per-call ``num_items_in_batch`` / ``attention_mask``. See :func:`fused_linear_kd_loss`.

    Args:
        weight_hard_loss: weight of the cross-entropy on ``true_labels`` (Liger's default 0.5).
        weight_soft_loss: weight of the divergence (0.5).
        beta: 0 forward KL, 1 reverse KL, between the generalised JSD (0.5).
        ignore_index: label value of tokens that do not count (-100).
        temperature: softmax temperature of the soft term (1.0).
        chunk_size: tokens per chunk (None: sized by the vocabulary, 1024 at V = 49152).
        return_soft_hard_loss: return ``(loss, soft_loss, hard_loss)``.
        top_k: divergence over the teacher's top-k ids only (None: full vocabulary).
        tau_squared: multiply the soft term by temperature^2 (False, as Liger).
        student_softcap, teacher_softcap: final-logit soft-caps (``config.final_logit_softcapping``).
        impl: ``"auto"`` | ``"triton"`` | ``"chunked"`` | ``"naive"``.
    Example:
        >>> loss_fn = LinearKDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)
        >>> loss = loss_fn(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight, labels)
        >>> loss.backward()
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, chunk_size: int | None = None,
                 return_soft_hard_loss: bool = False, *, top_k: int | None = None, tau_squared: bool = False,
                 student_softcap: float | None = None, teacher_softcap: float | None = None,
                 impl: str = "auto") -> None:
        super().__init__()
        _check_options(weight_hard_loss, weight_soft_loss, beta, temperature, top_k, chunk_size)
        self.weight_hard_loss, self.weight_soft_loss, self.beta = weight_hard_loss, weight_soft_loss, beta
        self.ignore_index, self.temperature, self.chunk_size = ignore_index, temperature, chunk_size
        self.return_soft_hard_loss, self.top_k, self.tau_squared = return_soft_hard_loss, top_k, tau_squared
        self.student_softcap, self.teacher_softcap, self.impl = student_softcap, teacher_softcap, impl

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: torch.Tensor | None = None,
                student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None, *,
                num_items_in_batch: int | float | torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The loss of one batch; arguments as :func:`fused_linear_kd_loss`.

        Returns:
            fp32 scalar loss, or ``(loss, soft_loss, hard_loss)`` with ``return_soft_hard_loss``.
        """
        return fused_linear_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            weight_hard_loss=self.weight_hard_loss, weight_soft_loss=self.weight_soft_loss, beta=self.beta,
            temperature=self.temperature, ignore_index=self.ignore_index, top_k=self.top_k,
            num_items_in_batch=num_items_in_batch, attention_mask=attention_mask,
            student_softcap=self.student_softcap, teacher_softcap=self.teacher_softcap, tau_squared=self.tau_squared,
            chunk_size=self.chunk_size, impl=self.impl, return_soft_hard_loss=self.return_soft_hard_loss,
        )

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, beta={self.beta}, "
                f"temperature={self.temperature}, top_k={self.top_k}, tau_squared={self.tau_squared}")
