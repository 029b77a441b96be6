"""Hugging Face ``Trainer`` path: :class:`KDTrainer` distills a frozen teacher into the trained model.

``compute_loss`` runs the student's backbone (its forward with ``logits_to_keep`` = no position, so the
lm_head GEMM is skipped, and ``output_hidden_states=True`` for the final normed hidden states), the
teacher's the same way under ``no_grad``, and calls the fused loss
:class:`minitron.losses.LinearKDLoss` on the hidden states and the two lm_head weights: no (B, S, V)
logits exist. Everything else is the ``Trainer``'s: datasets, collators (padded batches with
``labels = -100``), optimizer, schedule, gradient accumulation, DDP / FSDP, checkpoints.

Token accounting: position ``i`` predicts token ``i + 1``. With ``kd_positions="labels"`` (default) the
soft and hard terms count the positions whose next label is not -100 (the positions HF's causal-LM loss
counts); with ``"all"`` the soft term counts every real token (``attention_mask``), the last one included,
as :func:`minitron.distill` does on packed blocks. The loss is summed and divided by
``num_items_in_batch``, which this trainer counts over all gradient-accumulation micro-batches (and
across ranks with ``average_tokens_across_devices``), so accumulated gradients equal the full batch's.

The teacher is not part of ``self.model``: it is never saved in checkpoints, never given to the
optimizer, kept in eval mode with ``requires_grad=False`` and moved to the student's device on first
use. Under FSDP the teacher is not sharded (each rank holds a full copy), and the loss reads the
student's lm_head weight outside the lm_head's own forward, so the lm_head must sit in the root FSDP
unit (whose parameters FSDP2 keeps gathered from forward to backward); DDP and FSDP are not tested here
(the tests are single-process, CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from minitron.adapters import lm_head_params
from minitron.losses.cross_entropy import softcap_of
from minitron.losses.linear_kd import LinearKDLoss, fused_linear_kd_loss

__all__ = ["KD_POSITIONS", "KDTrainer", "batch_kd_loss", "count_kd_tokens", "kd_targets"]

KD_POSITIONS = ("labels", "all")


def _final_hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """(B, S, H) final normed hidden states from the model's own forward, with no logits computed."""
    none = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)  # logits for no position
    out = model(**inputs, logits_to_keep=none, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / DeepSpeed / accelerate wrappers (``.module``); FSDP2 does not wrap."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def kd_targets(inputs: dict[str, Any], kd_positions: str = "labels") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token labels of a collated batch and, for ``kd_positions="all"``, the soft-term mask.

    Args:
        inputs: ``input_ids`` (B, S), optional ``attention_mask`` (B, S) and unshifted ``labels`` (B, S)
            with -100 where not counted (as HF collators make them); no labels: the inputs themselves.
        kd_positions: ``"labels"`` or ``"all"`` (see the module docstring).
    Returns:
        ``(nxt, soft_mask)``: nxt (B, S) with ``nxt[:, i] = labels[:, i + 1]`` (-100 at the last position and
        wherever position i or i + 1 is padding); soft_mask (B, S) bool of the real tokens, or None.
    Example:
        >>> kd_targets({"input_ids": torch.tensor([[5, 6, 7]])})[0]
        tensor([[   6,    7, -100]])
    """
    if kd_positions not in KD_POSITIONS:
        raise ValueError(f"kd_positions={kd_positions!r}; allowed values: {', '.join(KD_POSITIONS)}")
    ids, attn = inputs["input_ids"], inputs.get("attention_mask")
    labels = inputs.get("labels")
    if labels is None:  # plain LM data: the inputs themselves, padding excluded
        labels = ids if attn is None else ids.masked_fill(attn == 0, -100)
    if labels.shape != ids.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but input_ids {tuple(ids.shape)}: pass "
                         "unshifted labels aligned with input_ids (-100 where not counted), as HF collators do")
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]  # position i predicts token i + 1
    if attn is not None:  # neither a padded position nor one predicting a padded token counts
        nxt[:, :-1] = nxt[:, :-1].masked_fill(attn[:, 1:] == 0, -100)
        nxt = nxt.masked_fill(attn == 0, -100)
    soft = None
    if kd_positions == "all":
        soft = torch.ones_like(ids, dtype=torch.bool) if attn is None else attn != 0
    return nxt, soft


def count_kd_tokens(inputs: dict[str, Any], kd_positions: str = "labels") -> torch.Tensor:
    """Tokens :func:`batch_kd_loss` counts in one batch (its ``num_items_in_batch`` share).

    Args:
        inputs: a collated batch (see :func:`kd_targets`).
        kd_positions: ``"labels"`` or ``"all"``.
    Returns:
        0-d integer tensor.
    Example:
        >>> int(count_kd_tokens({"input_ids": torch.tensor([[5, 6, 7]])}))
        2
    """
    nxt, soft = kd_targets(inputs, kd_positions)
    return (nxt != -100).sum() if soft is None else soft.sum()


def batch_kd_loss(model: nn.Module, teacher: nn.Module, inputs: dict[str, Any], kd_loss: LinearKDLoss, *,
                  num_items_in_batch: torch.Tensor | int | None = None, kd_positions: str = "labels"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused KD loss of one collated batch: both models without their lm_head GEMM, then ``kd_loss``.

    The body of :meth:`KDTrainer.compute_loss`, usable from any trainer's ``compute_loss`` (TRL's
    ``SFTTrainer`` / ``GKDTrainer``: see README). The teacher is put in eval mode and on the student's
    device; it runs under ``no_grad``.

    Args:
        model: the student (possibly DDP / accelerate wrapped).
        teacher: the frozen teacher, same token ids.
        inputs: collated batch (see :func:`kd_targets`); every key but ``labels`` goes to both forwards.
        kd_loss: its options (weights, beta, temperature, top-k, soft-caps, tau_squared, impl) are used.
        num_items_in_batch: the divisor (HF's count over the accumulated batch); None: this batch's count.
        kd_positions: ``"labels"`` or ``"all"``.
    Returns:
        ``(loss, soft_loss, hard_loss)`` fp32 scalars.
    Example:
        >>> loss, soft, hard = batch_kd_loss(student, teacher, batch, LinearKDLoss(beta=0.0))
    """
    nxt, soft_mask = kd_targets(inputs, kd_positions)
    if num_items_in_batch is None:
        num_items_in_batch = (nxt != -100).sum() if soft_mask is None else soft_mask.sum()
    fwd = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    h_s = _final_hidden(model, fwd)  # (B, S, Hs)
    if teacher.training:
        teacher.eval()
    wt, bt = lm_head_params(teacher)
    if wt.device != h_s.device:  # the teacher follows the student (a Trainer moves only its model)
        teacher.to(h_s.device)
        wt, bt = lm_head_params(teacher)
    with torch.no_grad():
        h_t = _final_hidden(teacher, fwd)  # (B, S, Ht)
    ws, bs = lm_head_params(_unwrap(model))
    f = kd_loss
    opts = dict(beta=f.beta, temperature=f.temperature, ignore_index=-100, top_k=f.top_k,
                num_items_in_batch=num_items_in_batch, student_softcap=f.student_softcap,
                teacher_softcap=f.teacher_softcap, tau_squared=f.tau_squared, chunk_size=f.chunk_size, impl=f.impl)
    if soft_mask is None:  # both terms on the positions with a next-token label
        return fused_linear_kd_loss(h_s, ws, h_t, wt, nxt, bs, bt, weight_hard_loss=f.weight_hard_loss,
                                    weight_soft_loss=f.weight_soft_loss, return_soft_hard_loss=True, **opts)
    # "all": the soft term on every real token, the hard one (if weighted) on the labelled positions
    soft = fused_linear_kd_loss(h_s, ws, h_t, wt, None, bs, bt, attention_mask=soft_mask, weight_hard_loss=0.0,
                                weight_soft_loss=1.0, **opts)
    hard = soft.new_zeros(())
    if f.weight_hard_loss > 0:
        hard = fused_linear_kd_loss(h_s, ws, h_t, wt, nxt, bs, bt, weight_hard_loss=1.0, weight_soft_loss=0.0, **opts)
    return f.weight_hard_loss * hard + f.weight_soft_loss * soft, soft, hard


class KDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss distills ``teacher_model`` into ``model`` with the fused KD loss.

    Args:
        model: the student, a Hugging Face ``*ForCausalLM`` (trained).
        args: ``TrainingArguments``.
        teacher_model: a Hugging Face ``*ForCausalLM`` with the same token ids (frozen; its lm_head may have
            more rows, which are dropped: the teacher is renormalised over the student's ids).
        kd_loss: the loss; default ``LinearKDLoss(weight_hard_loss=0, weight_soft_loss=1, beta=0,
            tau_squared=True)``: forward KL only, as :func:`minitron.distill`'s default. Its soft-caps,
            when None, are taken from the models' ``final_logit_softcapping``.
        kd_positions: ``"labels"`` (positions whose next-token label counts) or ``"all"`` (every real
            token, as ``minitron.distill`` on packed blocks); see the module docstring.
        **kwargs: the other ``Trainer`` arguments (``train_dataset``, ``data_collator``, ``optimizers``...).
    Example:
        >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments("out"),
        ...                     train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        >>> trainer.train()
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by num_items_in_batch (the whole accumulated batch)

    def __init__(self, model: nn.Module | None = None, args: Any = None, *, teacher_model: nn.Module,
                 kd_loss: LinearKDLoss | None = None, kd_positions: str = "labels", **kwargs: Any) -> None:
        if kd_positions not in KD_POSITIONS:
            raise ValueError(f"kd_positions={kd_positions!r}; allowed values: {', '.join(KD_POSITIONS)}")
        if teacher_model is None or teacher_model is model:
            raise ValueError("teacher_model must be a separate model from the student (pass the frozen teacher)")
        if kd_loss is not None and not isinstance(kd_loss, LinearKDLoss):
            raise ValueError(f"kd_loss must be a minitron.losses.LinearKDLoss, got {type(kd_loss).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        lm_head_params(teacher_model)  # raises now for a teacher without an lm_head
        self.kd_loss = kd_loss if kd_loss is not None else LinearKDLoss(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, tau_squared=True)
        if self.kd_loss.student_softcap is None:
            self.kd_loss.student_softcap = softcap_of(self.model)
        if self.kd_loss.teacher_softcap is None:
            self.kd_loss.teacher_softcap = softcap_of(teacher_model)
        self.kd_positions = kd_positions
        self.teacher = teacher_model.eval().requires_grad_(False)

    # ---- token accounting -------------------------------------------------------------------

    def _count(self, inputs: dict[str, Any]) -> torch.Tensor:
        return count_kd_tokens(inputs, self.kd_positions)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Tokens the loss counts over all micro-batches of one optimizer step (summed across ranks if averaging)."""
        if not batch_samples:
            return None
        count = sum(self._count(b) for b in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count.to(device)).sum()
        return count.to(device)

    # ---- loss -------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """Fused KD loss of one micro-batch, divided by ``num_items_in_batch``.

        Args:
            model: the (possibly wrapped) student.
            inputs: a collated batch: ``input_ids`` (B, S), optional ``attention_mask`` and ``labels`` (-100).
            return_outputs: also return ``{"soft_loss", "hard_loss"}`` (for ``prediction_step``).
            num_items_in_batch: counted tokens of the whole accumulated batch (this trainer's count).
        Returns:
            The fp32 scalar loss, or ``(loss, outputs)``.
        Raises:
            ValueError: a non-finite loss (names the step and the usual fixes).
        """
        if self.args.n_gpu > 1:
            raise ValueError("KDTrainer does not support torch.nn.DataParallel (n_gpu > 1 in one process); "
                             "launch one process per GPU with torchrun / accelerate")
        loss, soft, hard = batch_kd_loss(model, self.teacher, inputs, self.kd_loss,
                                         num_items_in_batch=num_items_in_batch, kd_positions=self.kd_positions)
        if model.training and not torch.isfinite(loss):
            raise ValueError(f"non-finite KD loss ({loss.item()}) at step {self.state.global_step + 1} "
                             f"(soft {soft.item()}, hard {hard.item()}): lower the learning rate, check the data, "
                             "or train in fp32")
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, {"soft_loss": soft.detach(), "hard_loss": hard.detach()}) if return_outputs else loss
