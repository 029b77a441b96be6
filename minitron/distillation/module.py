"""The model side of distillation: one root module whose ``forward`` returns the losses.

:class:`DistillModule` holds the student, the frozen teacher and the intermediate-state
projections, so DDP / ``fully_shard`` wrap a single root (docs/method.md section 4). Decoder stacks
and lm_heads are found through :mod:`minitron.adapters`; the losses are in :mod:`minitron.losses`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from minitron.adapters import base_decoder, lm_head_params
from minitron.distillation.config import DistillConfig
from minitron.losses import linear_kd_loss
from minitron.losses.cross_entropy import linear_cross_entropy as _linear_cross_entropy, softcap_of
from minitron.losses.intermediate import IntermediateProjections, dynamic_alpha, intermediate_state_loss
from minitron.losses.cached import topk_tail_kd_loss
from minitron.losses.linear_kd import shared_vocab_head


def _autocast_off(fn: Callable) -> Callable:
    """Run a loss that builds fp32 logits as ``h.float() @ w.float().t()`` with autocast off.

    Under bf16 autocast that matmul would run in bf16 and round the logits (and the top-k + tail KL of
    an offline teacher came out slightly negative). ``linear_kd_loss`` and ``topk_tail_kd_loss`` handle
    autocast themselves (:mod:`minitron.losses.precision`: fp32 logits, bf16 gradient GEMMs where the CPU
    has native bf16); the cross-entropy loss is called through this.
    """
    @functools.wraps(fn)
    def call(h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_autocast_enabled(h.device.type):
            return fn(h, *args, **kwargs)
        with torch.autocast(h.device.type, enabled=False):
            return fn(h, *args, **kwargs)

    return call


linear_cross_entropy = _autocast_off(_linear_cross_entropy)


def hidden_size(model: nn.Module) -> int:
    return int(lm_head_params(model)[0].shape[1])


# the most probability a larger-vocabulary teacher may put on ids the student lacks (per token of
# the first batch) for its extra lm_head rows to count as padding; the KD losses renormalise it away
TEACHER_OUTSIDE_MASS_LIMIT = 1e-3


@torch.no_grad()
def check_teacher_padding(student: nn.Module, teacher: nn.Module, x: torch.Tensor, cfg: DistillConfig,
                           device: torch.device, chunk: int = 1024) -> None:
    """Raise if a teacher with more vocabulary rows than the student puts real probability on the extra ids.

    All-zero extra rows (weight and bias) are padding by construction and are not counted.
    """
    vs = int(lm_head_params(student)[0].shape[0])
    wt, bt = lm_head_params(teacher)
    extra = (wt[vs:] != 0).any(-1) if bt is None else (wt[vs:] != 0).any(-1) | (bt[vs:] != 0)  # (Vt - vs,)
    if not bool(extra.any()):  # no extra rows, or all zero: padding by construction, whatever mass they get
        return
    real = vs + extra.nonzero().squeeze(-1)  # ids of the non-zero extra rows: maybe real tokens
    h = base_decoder(teacher)(input_ids=x.to(device), use_cache=False).last_hidden_state  # (B, T, Ht)
    h = h.reshape(-1, h.shape[-1])
    worst = 0.0
    for i in range(0, h.shape[0], chunk):
        logits = (h[i : i + chunk].to(wt.dtype) @ wt.t()).float()  # (c, Vt)
        if bt is not None:
            logits += bt.float()
        logits /= cfg.temperature
        outside = torch.logsumexp(logits[:, real], -1) - torch.logsumexp(logits, -1)  # log mass on non-zero extra ids
        worst = max(worst, float(outside.max().exp()))
    if not worst <= TEACHER_OUTSIDE_MASS_LIMIT:
        raise ValueError(
            f"the teacher's lm_head has {wt.shape[0]} rows but the student's {vs}, and the teacher puts up to "
            f"{worst:.2%} of its probability on ids >= {vs} ({real.numel()} non-zero rows; limit "
            f"{TEACHER_OUTSIDE_MASS_LIMIT:.1%}): those rows are real tokens, not padding; distill a student with the "
            "teacher's vocabulary (e.g. one pruned from it)"
        )


class DistillModule(nn.Module):
    """Student + frozen teacher + projections; ``forward`` returns a dict of losses.

    ``teacher=None``: an offline teacher (:mod:`minitron.distillation.teacher_cache`); ``forward`` then
    takes the cached ``(ids, logits, lse)`` of its blocks and the KD loss is the top-k + tail KL.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig) -> None:
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        pairs = cfg.intermediate_layers or []
        self.projections = IntermediateProjections(pairs, hidden_size(student), hidden_size(teacher)) if pairs else None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        s_layers = base_decoder(student).layers
        t_layers = base_decoder(teacher).layers if pairs else []
        for s, t in pairs:
            if not (0 <= s < len(s_layers) and 0 <= t < len(t_layers)):
                raise ValueError(
                    f"intermediate_layers pair ({s}, {t}) out of range: student has {len(s_layers)} layers, "
                    f"teacher has {len(t_layers)}"
                )
        self._hooks = [
            layers[i].register_forward_hook(self._capture_hook((side, i)))
            for side, layers, idx in (("s", s_layers, {p[0] for p in pairs}), ("t", t_layers, {p[1] for p in pairs}))
            for i in sorted(idx)
        ]

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the user's models (called when training ends)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._captured.clear()

    def _capture_hook(self, key: tuple[str, int]) -> Callable:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            self._captured[key] = out[0] if isinstance(out, (tuple, list)) else out  # (B, T, H)

        return hook

    def forward(self, input_ids: torch.Tensor, mode: str = "train", cached: tuple[torch.Tensor, ...] | None = None
                ) -> dict[str, torch.Tensor]:
        """input_ids (B, T) -> losses. ``mode="eval"`` returns per-token sums for exact averaging.

        ``cached``: ``(ids (B, T, k), logits (B, T, k), lse (B, T))`` of an offline teacher (``teacher=None``).
        """
        cfg = self.cfg
        self._captured.clear()
        if self.teacher is None:
            return self._forward_cached(input_ids, mode, cached)
        h_t = None
        if mode == "eval" or cfg.kd_weight > 0:  # a CE-only run never needs the teacher
            with torch.no_grad():
                h_t = base_decoder(self.teacher)(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, Ht)
        h_s = base_decoder(self.student)(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, Hs)
        ws, bs = lm_head_params(self.student)
        wt_full, bt_full = lm_head_params(self.teacher)
        wt, bt = shared_vocab_head(wt_full, bt_full, ws.shape[0])  # KD over the shared ids (see distill())
        cap_s, cap_t = softcap_of(self.student), softcap_of(self.teacher)  # final-logit soft-caps (Gemma 2)
        B, T = input_ids.shape
        hs_flat = h_s.reshape(B * T, -1)  # (N, Hs)
        ht_flat = h_t.reshape(B * T, -1) if h_t is not None else None  # (N, Ht)
        labels = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
        if mode == "eval":  # token sums: LM loss, KL(teacher || student) at tau=1, teacher LM loss
            n_lm = labels.numel()
            ce_s = linear_cross_entropy(h_s[:, :-1].reshape(-1, h_s.shape[-1]), ws, labels, bs, chunk_size=cfg.ce_chunk_size,
                                        softcap=cap_s)
            ce_t = linear_cross_entropy(h_t[:, :-1].reshape(-1, h_t.shape[-1]), wt_full, labels, bt_full,
                                        chunk_size=cfg.ce_chunk_size, softcap=cap_t)
            kl = linear_kd_loss(hs_flat, ws, ht_flat, wt, student_bias=bs, teacher_bias=bt, loss="forward_kl",
                                impl=cfg.loss_impl, student_softcap=cap_s, teacher_softcap=cap_t)
            return {"lm_sum": ce_s * n_lm, "teacher_lm_sum": ce_t * n_lm, "kl_sum": kl * (B * T),
                    "n_lm": ce_s.new_tensor(float(n_lm)), "n_tok": ce_s.new_tensor(float(B * T))}

        zero = h_s.new_zeros((), dtype=torch.float32)
        out = {"kd_loss": zero, "ce_loss": zero, "is_loss": zero, "alpha": zero}
        total = zero
        if cfg.kd_weight > 0:
            kd = linear_kd_loss(
                hs_flat, ws, ht_flat, wt, student_bias=bs, teacher_bias=bt, loss=cfg.logits_loss, beta=cfg.jsd_beta,
                temperature=cfg.temperature, top_k=cfg.top_k, impl=cfg.loss_impl,
                student_softcap=cap_s, teacher_softcap=cap_t,
            )
            out["kd_loss"] = kd
            kd_total = kd
            if self.projections is not None:
                pairs = self.projections.pairs
                l_is = intermediate_state_loss(
                    [self._captured[("s", s)] for s, _ in pairs], [self._captured[("t", t)] for _, t in pairs],
                    self.projections.proj, kind=cfg.intermediate_loss,
                )
                alpha = dynamic_alpha(kd, l_is)
                out["is_loss"], out["alpha"] = l_is, alpha
                kd_total = kd + alpha * l_is
            total = total + cfg.kd_weight * kd_total
        if cfg.clm_weight > 0:
            ce = linear_cross_entropy(h_s[:, :-1].reshape(-1, h_s.shape[-1]), ws, labels, bs, chunk_size=cfg.ce_chunk_size,
                                      softcap=cap_s)
            out["ce_loss"] = ce
            total = total + cfg.clm_weight * ce
        out["loss"] = total
        self._captured.clear()
        return out

    def _forward_cached(self, input_ids: torch.Tensor, mode: str, cached: tuple[torch.Tensor, ...] | None
                        ) -> dict[str, torch.Tensor]:
        """Losses against an offline teacher: top-k + tail KL on every position, optional CLM term."""
        cfg = self.cfg
        h_s = base_decoder(self.student)(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, Hs)
        ws, bs = lm_head_params(self.student)
        cap_s = softcap_of(self.student)
        labels = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
        h_lm = h_s[:, :-1].reshape(-1, h_s.shape[-1])
        if mode == "eval":  # no teacher for the eval data: its metrics are NaN
            ce = linear_cross_entropy(h_lm, ws, labels, bs, chunk_size=cfg.ce_chunk_size, softcap=cap_s)
            nan = ce.new_tensor(float("nan"))
            return {"lm_sum": ce * labels.numel(), "teacher_lm_sum": nan, "kl_sum": nan,
                    "n_lm": ce.new_tensor(float(labels.numel())), "n_tok": ce.new_tensor(float(input_ids.numel()))}
        zero = h_s.new_zeros((), dtype=torch.float32)
        out = {"kd_loss": zero, "ce_loss": zero, "is_loss": zero, "alpha": zero}
        total = zero
        if cfg.kd_weight > 0:
            if cached is None:
                raise ValueError("a DistillModule without a teacher needs the cached teacher rows of its batch")
            ids, z, lse = cached
            out["kd_loss"] = kd = topk_tail_kd_loss(h_s, ws, ids, z, lse, student_bias=bs, temperature=cfg.temperature,
                                                    chunk_size=cfg.ce_chunk_size, student_softcap=cap_s)
            total = total + cfg.kd_weight * kd
        if cfg.clm_weight > 0:
            out["ce_loss"] = ce = linear_cross_entropy(h_lm, ws, labels, bs, chunk_size=cfg.ce_chunk_size, softcap=cap_s)
            total = total + cfg.clm_weight * ce
        out["loss"] = total
        return out
