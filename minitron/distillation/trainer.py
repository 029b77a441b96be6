"""Knowledge-distillation trainer: ``distill(student, teacher, train_data, ...)``.

Loss (METHOD.md section 4): ``L = clm_weight * L_CLM + kd_weight * (L_logits + alpha * L_is)``.
``L_logits`` comes from :func:`minitron.losses.linear_kd_loss`, which takes the final normed
hidden states and the lm_head weights (never logits), so a fused kernel plugs in; ``L_CLM`` is a
chunked cross-entropy (:func:`minitron.distillation.losses.linear_cross_entropy`); ``L_is`` and its
dynamic ``alpha`` are in :mod:`minitron.distillation.losses`.

Single process, DDP and FSDP2 (``torchrun``) share one code path: student, teacher and the
intermediate projections sit in one wrapper module whose ``forward`` returns the losses, so DDP /
``fully_shard`` wrap a single root. The batch of optimizer step ``s`` is a pure function of
``(seed, s)`` (:func:`minitron.distillation.data.batch_indices`), which is what makes resume exact.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from minitron.atomic import atomic_write_dir, atomic_write_text
from minitron.distillation.checkpoint import (
    check_student_tensors,
    latest_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tied_aliases,
)
from minitron.distillation.config import DistillConfig
from minitron.distillation.data import batch_indices, check_nonempty, load_blocks
from minitron.distillation.metrics import append_row, truncate_after
from minitron.distillation.run_dir import (
    METRICS,
    PLOT,
    RUN_FILE,
    check_same_run,
    open_run_dir,
    run_fingerprint,
    start_over,
)
from minitron.losses import check_impl_device
from minitron.losses.cross_entropy import softcap_of
from minitron.outputs import check_output_dir
from minitron.distillation.losses import (
    IntermediateProjections,
    dynamic_alpha,
    intermediate_state_loss,
    linear_cross_entropy,
)
from minitron.distillation.plotting import plot_loss_curve

Callback = Callable[[int, dict, nn.Module], None]


class NonFiniteLossError(ValueError, FloatingPointError):
    """The training loss became NaN/inf; the run stopped before the optimizer step."""


# --------------------------------------------------------------------------------------------
# model plumbing


def _decoder(model: nn.Module) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if dec is None or not hasattr(dec, "layers"):
        raise ValueError(
            f"{type(model).__name__}: cannot find the base decoder with a .layers list "
            "(expected a Hugging Face *ForCausalLM with model.get_decoder())"
        )
    return dec


def _lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head.weight, getattr(head, "bias", None)  # (V, H), (V,) | None (tied weights: the embedding)


def _hidden_size(model: nn.Module) -> int:
    return int(_lm_head(model)[0].shape[1])


# the most probability a larger-vocabulary teacher may put on ids the student lacks (per token of
# the first batch) for its extra lm_head rows to count as padding; the KD losses renormalise it away
TEACHER_OUTSIDE_MASS_LIMIT = 1e-3


def _shared_vocab_head(weight: torch.Tensor, bias: torch.Tensor | None, vocab: int
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``vocab`` rows of an lm_head (all of it if it has no more): softmax over them renormalises."""
    if weight.shape[0] <= vocab:
        return weight, bias
    return weight[:vocab], None if bias is None else bias[:vocab]


@torch.no_grad()
def _check_teacher_padding(student: nn.Module, teacher: nn.Module, x: torch.Tensor, cfg: DistillConfig,
                           device: torch.device, chunk: int = 1024) -> None:
    """Raise if a teacher with more vocabulary rows than the student puts real probability on the extra ids."""
    vs = int(_lm_head(student)[0].shape[0])
    wt, bt = _lm_head(teacher)
    if wt.shape[0] <= vs:
        return
    h = _decoder(teacher)(input_ids=x.to(device), use_cache=False).last_hidden_state  # (B, T, Ht)
    h = h.reshape(-1, h.shape[-1])
    worst = 0.0
    for i in range(0, h.shape[0], chunk):
        logits = (h[i : i + chunk].to(wt.dtype) @ wt.t()).float()  # (c, Vt)
        if bt is not None:
            logits += bt.float()
        logits /= cfg.temperature
        outside = torch.logsumexp(logits[:, vs:], -1) - torch.logsumexp(logits, -1)  # log mass on ids >= vs
        worst = max(worst, float(outside.max().exp()))
    if not worst <= TEACHER_OUTSIDE_MASS_LIMIT:
        raise ValueError(
            f"the teacher's lm_head has {wt.shape[0]} rows but the student's {vs}, and the teacher puts up to "
            f"{worst:.2%} of its probability on ids >= {vs} (limit {TEACHER_OUTSIDE_MASS_LIMIT:.1%}): those rows are "
            "real tokens, not padding; distill a student with the teacher's vocabulary (e.g. one pruned from it)"
        )


class _DistillModule(nn.Module):
    """Student + frozen teacher + projections; ``forward`` returns a dict of losses."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        self.student, self.teacher, self.cfg = student, teacher, cfg
        pairs = cfg.intermediate_layers or []
        self.projections = IntermediateProjections(pairs, _hidden_size(student), _hidden_size(teacher)) if pairs else None
        self._captured: dict[tuple[str, int], torch.Tensor] = {}
        s_layers, t_layers = _decoder(student).layers, _decoder(teacher).layers
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

    def forward(self, input_ids: torch.Tensor, mode: str = "train") -> dict[str, torch.Tensor]:
        """input_ids (B, T) -> losses. ``mode="eval"`` returns per-token sums for exact averaging."""
        cfg = self.cfg
        self._captured.clear()
        h_t = None
        if mode == "eval" or cfg.kd_weight > 0:  # a CE-only run never needs the teacher
            with torch.no_grad():
                h_t = _decoder(self.teacher)(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, Ht)
        h_s = _decoder(self.student)(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, Hs)
        ws, bs = _lm_head(self.student)
        wt_full, bt_full = _lm_head(self.teacher)
        wt, bt = _shared_vocab_head(wt_full, bt_full, ws.shape[0])  # KD over the shared ids (see distill())
        cap_s, cap_t = softcap_of(self.student), softcap_of(self.teacher)  # final-logit soft-caps (Gemma 2)
        B, T = input_ids.shape
        hs_flat = h_s.reshape(B * T, -1)  # (N, Hs)
        ht_flat = h_t.reshape(B * T, -1) if h_t is not None else None  # (N, Ht)
        labels = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
        from minitron.losses import linear_kd_loss

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


# --------------------------------------------------------------------------------------------
# input checks


def _embed_rows(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _check_models(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
    for name, m in (("student", student), ("teacher", teacher)):
        mpe = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if mpe is not None and cfg.seq_len > mpe:
            raise ValueError(
                f"seq_len={cfg.seq_len} exceeds the {name}'s max_position_embeddings={mpe}; "
                f"lower DistillConfig.seq_len to at most {mpe}"
            )
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(getattr(m, "config", None), attr, None) not in (None, 1.0):
                raise ValueError(
                    f"the {name} config sets {attr}; logits = hidden @ lm_head.T is assumed, which this model breaks"
                )


def _check_vocab(student: nn.Module, teacher: nn.Module, tokenizer: Any, teacher_tokenizer: Any,
                 blocks: Sequence[torch.Tensor]) -> None:
    vs, vt = int(_lm_head(student)[0].shape[0]), int(_lm_head(teacher)[0].shape[0])
    if tokenizer is not None and teacher_tokenizer is not None and tokenizer is not teacher_tokenizer:
        a, b = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        diff = sum(1 for tok, i in a.items() if b.get(tok) != i) + sum(1 for tok in b if tok not in a)
        if diff:
            raise ValueError(
                f"student and teacher tokenizers differ ({diff} tokens missing or mapped to other ids; sizes "
                f"{len(a)} vs {len(b)}); logit distillation needs one shared vocabulary (extra rows only as padding). "
                "Distill a student that uses the teacher's tokenizer (e.g. one pruned from the teacher)."
            )
    if tokenizer is not None and len(tokenizer) > min(vs, vt):
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the student/teacher lm_heads have {vs}/{vt} rows; "
            "the vocabularies cannot be reconciled by padding. Use the tokenizer the models were trained with."
        )
    limit = min(_embed_rows(student), _embed_rows(teacher), vs, vt)
    for b in blocks:
        if b.numel() and (int(b.max()) >= limit or int(b.min()) < 0):
            raise ValueError(
                f"data holds token id {int(b.max())} (min {int(b.min())}) but the student/teacher vocabularies have "
                f"{vs}/{vt} entries (usable ids 0..{limit - 1}); the data was tokenised with a different tokenizer "
                "or the vocabularies differ beyond padding"
            )


def _needs_tokenizer(data: Any) -> bool:
    if isinstance(data, torch.Tensor) or (isinstance(data, (str, os.PathLike)) and str(data).lower().endswith(".pt")):
        return False
    if isinstance(data, (list, tuple)) and data and not any(isinstance(d, str) for d in data):
        return False  # token-id lists
    cols = getattr(data, "column_names", None)
    return not (cols is not None and "input_ids" in cols)


def _resolve_tokenizer(student: nn.Module, tokenizer: Any, datas: Sequence[Any]) -> Any:
    if tokenizer is not None or not any(d is not None and _needs_tokenizer(d) for d in datas):
        return tokenizer
    from minitron.models import resolve_tokenizer

    return resolve_tokenizer(student, required=True)


# --------------------------------------------------------------------------------------------
# distributed setup


def _dist_env(cfg: DistillConfig) -> tuple[str, int, int, torch.device]:
    """(mode, rank, world_size, device); initialises the process group under torchrun."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel != "none" and (dist.is_available() and (dist.is_initialized() or world_env > 1)):
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world == 1:
        mode = "fsdp" if cfg.parallel == "fsdp" and dist.is_initialized() else "none"
    else:
        mode = "fsdp" if cfg.parallel == "fsdp" else "ddp"
    return mode, rank, world, device


def _all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / world
    return t


def _all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict (gathers FSDP2 DTensor shards; a collective under FSDP)."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").clone()
    return out


# --------------------------------------------------------------------------------------------
# the trainer


def _lr_lambda(cfg: DistillConfig) -> Callable[[int], float]:
    floor = cfg.min_lr / cfg.lr

    def f(step: int) -> float:  # step = optimizer steps done so far
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        decay = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def _param_groups(params: Sequence[tuple[str, nn.Parameter]], wd: float) -> list[dict]:
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _local_dir(obj: Any) -> str | None:
    """The local directory a model/tokenizer was loaded from, if any (an input the output must avoid)."""
    config = getattr(obj, "config", None)
    path = getattr(config, "_name_or_path", None) or getattr(obj, "name_or_path", None)
    return path if isinstance(path, str) and path and Path(path).is_dir() else None


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_data: Any,
    eval_data: Any = None,
    config: DistillConfig | None = None,
    *,
    tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    callbacks: Sequence[Callback] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Distill ``teacher`` into ``student`` (Minitron recipe: forward KL on logits, tau=1, KD only).

    Output directory: ``config.output_dir`` must be new, empty, or a previous distillation run; it
    must not be, hold or lie inside the student/teacher/tokenizer directories or the data files
    (``overwrite=True`` allows a non-empty directory of other files, which are left alone). One
    process at a time may use it (a lock file names the holder). Run files never use Hugging Face
    names: the run config is ``minitron_run.json``.

    Resume: with ``resume=True`` (the default) a run saved in ``output_dir`` is continued only if it
    is this run: same config (``steps`` and bookkeeping fields such as ``save_every`` may change),
    same student/teacher shapes and the same training tokens. Otherwise a ValueError says what
    differs; pass another ``output_dir``, or ``resume=False`` to discard the saved run and start
    over. Calling ``distill`` again after a finished run with the same arguments returns the
    finished weights without training. A checkpoint whose files cannot be read is skipped (with a
    warning) for the newest older one that can.

    Vocabularies: the teacher may have more lm_head rows than the student (padding, e.g. Qwen2.5 7B
    vs 0.5B). The logits losses then use the shared first ``Vs`` ids, with the teacher distribution
    renormalised over them; before training, a teacher that puts more than
    ``TEACHER_OUTSIDE_MASS_LIMIT`` (0.1%) of its probability on the extra ids for any token of the
    first batch is refused (those rows are real tokens, not padding). A larger student vocabulary
    is handled by padding the teacher with ``-inf`` logits.

    Args:
        student: Hugging Face causal LM to train (e.g. a pruned teacher); trained in place.
        teacher: Hugging Face causal LM; frozen (eval mode, no grad). Vocab sizes may differ (see above)
            if the token ids agree.
        train_data: ``datasets.Dataset`` (``text``/``input_ids``), list of strings or of token-id lists,
            ``.txt``/``.jsonl`` (or ``.pt`` token-id) path, or LongTensor of token ids; packed into
            ``seq_len`` blocks.
        eval_data: same kinds; evaluated every ``eval_every`` steps and at the end.
        config: :class:`DistillConfig`; keyword ``overrides`` replace its fields.
        tokenizer: tokenizer for text data (default: loaded from the student's local path, never downloaded).
        teacher_tokenizer: if given, must have the same vocabulary as ``tokenizer``.
        callbacks: ``cb(step, metrics, student)`` called after every optimizer step (after checkpointing).
    Returns:
        The trained student (also written to ``output_dir/final`` as an HF safetensors checkpoint).
        Under FSDP the returned module is still sharded; load ``output_dir/final`` instead.
    Raises:
        ValueError: empty data, ``seq_len`` beyond ``max_position_embeddings``, irreconcilable vocabularies,
            bad config, an unsafe or busy ``output_dir``, a saved run that is not this run, ``steps``
            below the saved step, a checkpoint that does not match the student.
            :class:`NonFiniteLossError` (a ValueError) on a NaN/inf loss, naming the step; the last
            good checkpoint is kept.
    Example:
        >>> student = distill(student, teacher, ["some text", ...], config=DistillConfig(
        ...     steps=1000, seq_len=1024, batch_size=8, output_dir="run/"), tokenizer=tok)
    """
    cfg = config if config is not None else DistillConfig()
    if overrides:
        cfg = DistillConfig(**{**cfg.to_dict(), **overrides})
    mode, rank, world, device = _dist_env(cfg)
    check_impl_device(cfg.loss_impl, device, name="loss_impl")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {world} "
                         "(it is the global micro-batch, split across ranks)")
    out_dir = Path(cfg.output_dir)
    is_main = rank == 0

    check_output_dir(out_dir, "distill", overwrite=cfg.overwrite, flag="output_dir", fix="overwrite=True",
                     inputs=[_local_dir(m) for m in (student, teacher, tokenizer, teacher_tokenizer)]
                     + [train_data, eval_data])
    _check_models(student, teacher, cfg)
    for d in (train_data, eval_data):
        check_nonempty(d)
    tokenizer = _resolve_tokenizer(student, tokenizer, [train_data, eval_data])
    train_blocks = load_blocks(train_data, tokenizer, cfg.seq_len, chat_template=cfg.chat_template)  # (n, T)
    eval_blocks = (load_blocks(eval_data, tokenizer, cfg.seq_len, chat_template=cfg.chat_template)
                   if eval_data is not None else None)
    _check_vocab(student, teacher, tokenizer, teacher_tokenizer, [train_blocks] + ([eval_blocks] if eval_blocks is not None else []))
    run_info = run_fingerprint(cfg, student, teacher, train_blocks)

    lock = open_run_dir(out_dir) if is_main else None
    try:
        resumed = load_latest(out_dir) if cfg.resume else None
        if resumed is not None:
            ckpt, state, saved_student = resumed
            check_same_run(json.loads(state["run"]), run_info, out_dir)
            if int(state["step"]) > cfg.steps:
                raise ValueError(f"checkpoint {ckpt} is at step {int(state['step'])}, past steps={cfg.steps}; pass steps "
                                 f">= {int(state['step'])} to continue that run, or resume=False to start over")
            check_student_tensors(saved_student, run_info["student"], tied_aliases(student), ckpt)
        elif is_main:
            start_over(out_dir)
        return _train(student, teacher, cfg, train_blocks, eval_blocks, tokenizer, callbacks, resumed, run_info,
                      mode, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def _train(
    student: nn.Module, teacher: nn.Module, cfg: DistillConfig, train_blocks: torch.Tensor,
    eval_blocks: torch.Tensor | None, tokenizer: Any, callbacks: Sequence[Callback] | None,
    resumed: tuple[Path, dict, dict] | None, run_info: dict, mode: str, rank: int, world: int, device: torch.device,
) -> nn.Module:
    """The training loop of :func:`distill`, after every check passed and the run directory is locked."""
    out_dir = Path(cfg.output_dir)
    is_main = rank == 0
    per_rank = cfg.batch_size // world
    teacher.eval()
    teacher.requires_grad_(False)
    student.train()
    student.to(device)
    teacher.to(device)
    if cfg.kd_weight > 0:  # before wrapping: a plain forward of the teacher, same on every rank
        _check_teacher_padding(student, teacher, train_blocks[batch_indices(train_blocks.shape[0], cfg.seed, 0, 0,
                                                                            cfg.batch_size, cfg.grad_accum)], cfg, device)
    module = _DistillModule(student, teacher, cfg).to(device)
    train_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    wrapped: nn.Module = module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    elif mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for m in (student, teacher):
            for layer in _decoder(m).layers:
                fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        train_params = [(n, p) for n, p in module.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    optimizer = torch.optim.AdamW(_param_groups(train_params, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"
                                                  and torch.cuda.is_bf16_supported())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # ---- resume -------------------------------------------------------------------------
    step = 0
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if resumed is not None:
        ckpt, state, saved_student = resumed
        full = {f"student.{k}": v for k, v in saved_student.items()}
        if module.projections is not None:
            if not isinstance(state.get("projections"), dict):
                raise ValueError(f"checkpoint {ckpt} has no intermediate-layer projections; it does not match this run")
            full.update({f"projections.{k}": v for k, v in state["projections"].items()})
        # strict=False: the teacher's tensors are not in the checkpoint (the student's were checked above)
        set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    else:
        random.seed(cfg.seed + rank)
        np.random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed + rank)

    metrics_path = out_dir / METRICS
    if is_main:
        if resumed is not None:
            truncate_after(metrics_path, step)  # atomic: the rows up to the resumed step survive any crash
        atomic_write_text(out_dir / RUN_FILE, json.dumps({k: run_info[k] for k in ("config", "data")}, indent=2) + "\n")

    def log(row: dict) -> None:
        if is_main:
            append_row(metrics_path, row)

    def evaluate() -> dict:
        wrapped.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        n_eval = eval_blocks.shape[0]
        n_batches = math.ceil(n_eval / cfg.batch_size)
        if cfg.eval_batches is not None:
            n_batches = min(n_batches, cfg.eval_batches)
        with torch.no_grad():
            for b in range(n_batches):
                glob = torch.arange(b * cfg.batch_size, min(n_eval, (b + 1) * cfg.batch_size))
                local = glob[rank * per_rank : (rank + 1) * per_rank]
                weight = 1.0 if local.numel() else 0.0  # every rank runs a forward (FSDP collectives)
                x = eval_blocks[local if local.numel() else glob[:1]].to(device)
                with autocast():
                    o = wrapped(x, mode="eval")
                sums += weight * torch.stack([o["lm_sum"], o["teacher_lm_sum"], o["kl_sum"], o["n_lm"], o["n_tok"]]
                                             ).double().cpu()
        sums = _all_sum(sums.to(device), world).cpu()
        wrapped.train()
        lm = float(sums[0] / sums[3])
        return {"split": "eval", "step": step, "lm_loss": lm, "ppl": math.exp(min(lm, 50.0)),
                "teacher_lm_loss": float(sums[1] / sums[3]), "kl_to_teacher": float(sums[2] / sums[4])}

    def checkpoint() -> None:
        student_state = _full_state(student)  # collective under FSDP
        proj_state = _full_state(module.projections) if module.projections is not None else None
        optim_state = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                            cpu_offload=True))
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if is_main:
            save_checkpoint(out_dir, step, student, student_state, {
                "step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "projections": proj_state, "rng": rngs, "world_size": world,
                "data": {"seed": cfg.seed, "n_blocks": int(train_blocks.shape[0]), "next_step": step},
                "run": json.dumps(run_info)}, keep=cfg.keep_checkpoints)
        if world > 1:
            dist.barrier()

    try:
        # ---- loop ---------------------------------------------------------------------------
        bar = None
        if is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc="distill", dynamic_ncols=True)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        if eval_blocks is not None and step == 0 and cfg.steps > 0:  # baseline: KL to teacher before training
            log(evaluate())
        keys = ("loss", "kd_loss", "ce_loss", "is_loss", "alpha")
        while step < cfg.steps:
            t0 = time.perf_counter()
            acc = torch.zeros(len(keys), device=device)
            for micro in range(cfg.grad_accum):
                idx = batch_indices(train_blocks.shape[0], cfg.seed, step, micro, cfg.batch_size, cfg.grad_accum)
                x = train_blocks[idx[rank * per_rank : (rank + 1) * per_rank]].to(device)  # (b, T)
                sync = micro == cfg.grad_accum - 1 or mode != "ddp"
                with (nullcontext() if sync else wrapped.no_sync()), autocast():
                    out = wrapped(x)
                    (out["loss"] / cfg.grad_accum).backward()
                acc += torch.stack([out[k].detach().float() for k in keys]) / cfg.grad_accum
            acc = _all_mean(acc, world).cpu()
            vals = dict(zip(keys, acc.tolist()))
            if not math.isfinite(vals["loss"]):
                last = latest_checkpoint(out_dir)
                if bar is not None:
                    bar.close()
                raise NonFiniteLossError(
                    f"non-finite training loss ({vals['loss']}) at step {step + 1} (kd={vals['kd_loss']}, "
                    f"ce={vals['ce_loss']}, is={vals['is_loss']}); stopped before the optimizer update. Last good "
                    f"checkpoint: {last if last is not None else 'none'}. Lower lr, check the data, or use fp32."
                )
            grad_norm = None  # not measured without clipping
            params = [p for _, p in train_params]
            if cfg.max_grad_norm:
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            row = {"split": "train", "step": step, **vals, "lr": lr, "grad_norm": grad_norm,
                   "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / max(dt, 1e-9)}
            if step % max(1, cfg.log_every) == 0:
                log(row)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{vals['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            last_step = step == cfg.steps
            if eval_blocks is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last_step):
                ev = evaluate()
                log(ev)
                row.update({f"eval_{k}": v for k, v in ev.items() if k not in ("split", "step")})
                if is_main and cfg.plot:
                    plot_loss_curve(metrics_path, out_dir / PLOT)
            if (cfg.save_every and step % cfg.save_every == 0) or last_step:
                checkpoint()
            for cb in callbacks or ():
                cb(step, row, student)
        if bar is not None:
            bar.close()

        # ---- final HF checkpoint --------------------------------------------------------------
        final_state = _full_state(student)
        if is_main:
            def write_final(tmp: Path) -> None:
                student.save_pretrained(tmp, state_dict=final_state)
                if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                    tokenizer.save_pretrained(tmp)

            atomic_write_dir(out_dir / "final", write_final)
            if cfg.plot:
                plot_loss_curve(metrics_path, out_dir / PLOT)
        if world > 1:
            dist.barrier()
    finally:
        module.remove_hooks()
    student.eval()
    return student
