"""Knowledge-distillation trainer: ``distill(student, teacher, train_data, ...)``.

Loss (docs/method.md section 4): ``L = clm_weight * L_CLM + kd_weight * (L_logits + alpha * L_is)``.
``L_logits`` comes from :func:`minitron.losses.linear_kd_loss`, which takes the final normed
hidden states and the lm_head weights (never logits), so a fused kernel plugs in; ``L_CLM`` is a
chunked cross-entropy (:func:`minitron.losses.cross_entropy.linear_cross_entropy`); ``L_is`` and its
dynamic ``alpha`` are in :mod:`minitron.losses.intermediate`.

Single process, DDP and FSDP2 (``torchrun``) share one code path: student, teacher and the
intermediate projections sit in one wrapper module whose ``forward`` returns the losses
(:class:`minitron.distillation.module.DistillModule`), so DDP / ``fully_shard`` wrap a single root
(:mod:`minitron.distillation.distributed`). :func:`distill` checks the inputs and locks the run
directory; :class:`Trainer` resumes, trains, evaluates and saves. The batch of optimizer step ``s``
is a pure function of ``(seed, s)`` (:func:`minitron.distillation.data.batch_indices`), which is what makes resume exact.
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
from torch import nn

from minitron.distillation import distributed as D
from minitron.distillation.checkpoint import last_good_checkpoint, rng_state, save_checkpoint, set_rng_state
from minitron.distillation.checks import check_models, check_vocab, local_dir
from minitron.data import resolve_seq_len
from minitron.distillation.config import DEFAULT_DISTILL_SEQ_LEN, DistillConfig
from minitron.distillation.data import batch_indices, check_nonempty, load_blocks, resolve_tokenizer
from minitron.distillation.metrics import append_row, truncated_text
from minitron.distillation.module import TEACHER_OUTSIDE_MASS_LIMIT, DistillModule, check_teacher_padding
from minitron.distillation.optim import make_optimizer
from minitron.distillation.plotting import plot_loss_curve
from minitron.distillation.run_dir import (METRICS, PLOT, RUN_FILE, check_run_dir, load_resumable, open_run_dir,
                                          run_fingerprint, start_over)
from minitron.distillation.sharded_load import check_meta_teacher_padding
from minitron.distillation.teacher_cache import TeacherCache, as_teacher_cache, check_cached_run
from minitron.losses import check_impl_device
from minitron.outputs import write_output_dir
from minitron.owned import record_prefix, replace_owned, write_text_owned

__all__ = ["Callback", "NonFiniteLossError", "TEACHER_OUTSIDE_MASS_LIMIT", "Trainer", "distill"]

Callback = Callable[[int, dict, nn.Module], None]


class NonFiniteLossError(ValueError, FloatingPointError):
    """The training loss became NaN/inf; the run stopped before the optimizer step."""


def distill(
    student: nn.Module,
    teacher: nn.Module | str | TeacherCache,
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
    finished weights without training. A checkpoint whose files changed since it was saved (their
    recorded SHA-256) or cannot be read is skipped, with a warning, for the newest older good one.

    Vocabularies: the teacher may have more lm_head rows than the student (padding, e.g. Qwen2.5 7B
    vs 0.5B). The logits losses then use the shared first ``Vs`` ids, with the teacher distribution
    renormalised over them; before training, a teacher that puts more than
    ``TEACHER_OUTSIDE_MASS_LIMIT`` (0.1%) of its probability on the extra ids for any token of the
    first batch is refused (those rows are real tokens, not padding); all-zero extra rows are padding
    and never refused. A larger student vocabulary is handled by padding the teacher with ``-inf``
    logits (reverse KL, which that makes infinite, is refused before training).

    Args:
        student: Hugging Face causal LM to train (e.g. a pruned teacher); trained in place.
        teacher: Hugging Face causal LM; frozen (eval mode, no grad). Vocab sizes may differ (see above)
            Or an offline teacher: a :func:`cache_teacher_logits` directory (or :class:`TeacherCache`) of this
            data; the KD loss is then the top-k + tail KL (forward KL only), no teacher is loaded, and the eval
            metrics of the teacher are NaN. A cache of other data, tokenizer, top_k or temperature is refused.
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
            a student that is (or shares weights with) the teacher, NaN/inf weights, bad config, an unsafe or busy ``output_dir``, a saved run that is not this run, ``steps``
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
    cache = as_teacher_cache(teacher)  # an offline teacher: no model
    teacher = None if cache is not None else teacher
    env = D.setup(cfg)
    check_impl_device(cfg.loss_impl, env.device, name="loss_impl")
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {env.world} "
                         "(it is the global micro-batch, split across ranks)")
    out_dir = Path(cfg.output_dir)
    check_run_dir(out_dir, overwrite=cfg.overwrite,
                  inputs=[local_dir(m) for m in (student, teacher, tokenizer, teacher_tokenizer)]
                  + [train_data, eval_data] + ([str(cache.path)] if cache is not None else []))
    D.barrier(env.world)  # every rank has checked output_dir before rank 0 locks and writes it
    if cfg.seq_len is None:  # the data's own rows, else the default that fits both models
        cfg = DistillConfig(**{**cfg.to_dict(), "seq_len": resolve_seq_len(
            train_data, cache.manifest["seq_len"] if cache else None, [student, teacher], default=DEFAULT_DISTILL_SEQ_LEN)})
    check_models(student, teacher, cfg)
    for d in (train_data, eval_data):
        check_nonempty(d)
    tokenizer = resolve_tokenizer(student, tokenizer, [train_data, eval_data])
    train_blocks = load_blocks(train_data, tokenizer, cfg.seq_len, chat_template=cfg.chat_template)  # (n, T)
    eval_blocks = (load_blocks(eval_data, tokenizer, cfg.seq_len, chat_template=cfg.chat_template)
                   if eval_data is not None else None)
    if cache is not None:
        check_cached_run(cache, cfg, student, train_blocks, tokenizer)
    check_vocab(student, teacher or student, tokenizer, teacher_tokenizer, [train_blocks] + ([eval_blocks] if eval_blocks is not None else []))
    run_info = run_fingerprint(cfg, student, teacher or student, train_blocks)
    if cache is not None:  # the cached teacher's identity instead of a model's shapes
        run_info["teacher"] = {"cache_weights_digest": [cache.manifest["teacher"]["weights_digest"]]}

    lock = open_run_dir(out_dir) if env.is_main else None
    try:
        resumed = load_resumable(out_dir, cfg, run_info, student) if cfg.resume else None
        if resumed is None and env.is_main:
            start_over(out_dir)
        trainer = Trainer(student, teacher, cfg, train_blocks, eval_blocks, env, tokenizer=tokenizer,
                          callbacks=callbacks, run_info=run_info, cache=cache)
        return trainer.run(resumed)
    finally:
        if lock is not None:
            lock.release()


# --------------------------------------------------------------------------------------------
# the trainer

_KEYS = ("loss", "kd_loss", "ce_loss", "is_loss", "alpha")  # training losses, averaged over micro-batches


class Trainer:
    """The training loop of :func:`distill`, after every check passed and the run directory is locked.

    :meth:`run` = :meth:`resume` (or a fresh seed) -> ``steps`` x :meth:`train_step` (with :meth:`evaluate`
    and :meth:`save` on their schedules) -> :meth:`save_final`. The batch of step ``s`` depends only on
    ``(seed, s)``, and :meth:`save` stores optimizer, scheduler and every rank's RNG state, so a
    resumed run continues exactly like the uninterrupted one.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig, train_blocks: torch.Tensor,
                 eval_blocks: torch.Tensor | None, env: D.DistEnv, *, tokenizer: Any = None,
                 callbacks: Sequence[Callback] | None = None, run_info: dict | None = None,
                 cache: TeacherCache | None = None) -> None:
        self.student, self.teacher, self.cfg, self.env, self.cache = student, teacher, cfg, env, cache
        self.train_blocks, self.eval_blocks = train_blocks, eval_blocks  # (n, T) token ids
        self.tokenizer, self.callbacks, self.run_info = tokenizer, list(callbacks or ()), run_info or {}
        self.out_dir = Path(cfg.output_dir)
        self.metrics_path = self.out_dir / METRICS
        self.per_rank = cfg.batch_size // env.world
        self.step = 0  # optimizer steps done
        device = env.device
        if teacher is not None:  # meta models (sharded_load.meta_model) stay on meta until D.wrap loads their shards
            D.to_device(teacher.eval().requires_grad_(False), device)
        student.train()
        D.to_device(student, device)
        if cfg.kd_weight > 0 and teacher is not None and D.on_meta(teacher):
            check_meta_teacher_padding(student, teacher)
        elif cfg.kd_weight > 0 and teacher is not None:  # before wrapping: a plain forward of the teacher, same on every rank
            first = batch_indices(train_blocks.shape[0], cfg.seed, 0, 0, cfg.batch_size, cfg.grad_accum)
            check_teacher_padding(student, teacher, train_blocks[first], cfg, device)
        self.module = D.to_device(DistillModule(student, teacher, cfg), device)
        self.wrapped = D.wrap(self.module, env, [m for m in (student, teacher) if m is not None])
        # after wrapping: FSDP replaces the parameters by sharded ones
        self.train_params = [(n, p) for n, p in self.module.named_parameters()
                             if p.requires_grad and not n.startswith("teacher.")]
        self.optimizer, self.scheduler = make_optimizer(self.train_params, cfg)
        use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"
                                                      and torch.cuda.is_bf16_supported())
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # ---- state ------------------------------------------------------------------------------

    def resume(self, resumed: tuple[Path, dict, dict] | None) -> None:
        """Load a checked checkpoint ``(path, trainer state, student tensors)``, or seed a fresh run."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        cfg, rank = self.cfg, self.env.rank
        if resumed is not None:
            ckpt, state, saved_student = resumed
            full = {f"student.{k}": v for k, v in saved_student.items()}
            if self.module.projections is not None:
                if not isinstance(state.get("projections"), dict):
                    raise ValueError(f"checkpoint {ckpt} has no intermediate-layer projections; it does not match this run")
                full.update({f"projections.{k}": v for k, v in state["projections"].items()})
            # strict=False: the teacher's tensors are not in the checkpoint (the student's were checked)
            set_model_state_dict(self.module, full, options=StateDictOptions(full_state_dict=True, strict=False))
            set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = int(state["step"])
            rngs = state["rng"]
            set_rng_state(rngs[rank] if len(rngs) == self.env.world else rngs[0])
        else:
            random.seed(cfg.seed + rank)
            np.random.seed(cfg.seed + rank)
            torch.manual_seed(cfg.seed + rank)
        if self.env.is_main:
            if resumed is not None:  # atomic: the rows up to the resumed step survive
                write_text_owned(self.out_dir, METRICS, truncated_text(self.metrics_path, self.step))
                record_prefix(self.out_dir, METRICS)
            write_text_owned(self.out_dir, RUN_FILE,
                             json.dumps({k: self.run_info[k] for k in ("config", "data")}, indent=2) + "\n")

    def save(self) -> None:
        """Write the checkpoint of the current step (a collective: every rank calls it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        cfg, env = self.cfg, self.env
        student_state = D.full_state(self.student)  # collective under FSDP
        proj_state = D.full_state(self.module.projections) if self.module.projections is not None else None
        optim_state = get_optimizer_state_dict(self.module, self.optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rngs = D.all_gather_objects(rng_state(), env.world)
        if env.is_main:
            save_checkpoint(self.out_dir, self.step, self.student, student_state, {
                "step": self.step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "projections": proj_state, "rng": rngs, "world_size": env.world,
                "data": {"seed": cfg.seed, "n_blocks": int(self.train_blocks.shape[0]), "next_step": self.step},
                "run": json.dumps(self.run_info)}, keep=cfg.keep_checkpoints)
            record_prefix(self.out_dir, METRICS)  # the rows so far are this run's (the marker proves them)
        D.barrier(env.world)

    def save_final(self) -> None:
        """Write ``output_dir/final`` (HF checkpoint + tokenizer; into a user's ``final/`` by name) and the plot."""
        final_state = D.full_state(self.student)
        if self.env.is_main:
            def write_final(tmp: Path) -> None:
                self.student.save_pretrained(tmp, state_dict=final_state)
                if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                    self.tokenizer.save_pretrained(tmp)

            write_output_dir(self.out_dir / "final", "final", write_final, overwrite=True)
            self.plot()
        D.barrier(self.env.world)

    def plot(self) -> None:
        """Redraw ``loss_curve.png`` (rank 0, when ``plot``) and record it as the run's."""
        staged = self.out_dir / f".{PLOT}.tmp-{os.getpid()}"  # a crash leaves a temp name cleaned on resume
        if self.env.is_main and self.cfg.plot and plot_loss_curve(self.metrics_path, staged):
            replace_owned(self.out_dir, PLOT, staged)

    # ---- steps ------------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        if self.env.is_main:
            append_row(self.metrics_path, row)

    def evaluate(self) -> dict:
        """Eval-set LM loss, perplexity, the teacher's LM loss and KL(teacher || student), token-exact."""
        cfg, env, eval_blocks = self.cfg, self.env, self.eval_blocks
        self.wrapped.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        n_eval = eval_blocks.shape[0]
        n_batches = math.ceil(n_eval / cfg.batch_size)
        if cfg.eval_batches is not None:
            n_batches = min(n_batches, cfg.eval_batches)
        with torch.no_grad():
            for b in range(n_batches):
                glob = torch.arange(b * cfg.batch_size, min(n_eval, (b + 1) * cfg.batch_size))
                local = glob[env.rank * self.per_rank : (env.rank + 1) * self.per_rank]
                weight = 1.0 if local.numel() else 0.0  # every rank runs a forward (FSDP collectives)
                x = eval_blocks[local if local.numel() else glob[:1]].to(env.device)
                with self.autocast():
                    o = self.wrapped(x, mode="eval")
                sums += weight * torch.stack([o["lm_sum"], o["teacher_lm_sum"], o["kl_sum"], o["n_lm"], o["n_tok"]]
                                             ).double().cpu()
        sums = D.all_sum(sums.to(env.device), env.world).cpu()
        self.wrapped.train()
        lm = float(sums[0] / sums[3])
        return {"split": "eval", "step": self.step, "lm_loss": lm, "ppl": math.exp(min(lm, 50.0)),
                "teacher_lm_loss": float(sums[1] / sums[3]), "kl_to_teacher": float(sums[2] / sums[4])}

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics row.

        Raises:
            NonFiniteLossError: NaN/inf loss (before the optimizer update; the last checkpoint is kept).
        """
        cfg, env = self.cfg, self.env
        t0 = time.perf_counter()
        acc = torch.zeros(len(_KEYS), device=env.device)
        for micro in range(cfg.grad_accum):
            idx = batch_indices(self.train_blocks.shape[0], cfg.seed, self.step, micro, cfg.batch_size, cfg.grad_accum)
            mine = idx[env.rank * self.per_rank : (env.rank + 1) * self.per_rank]
            x = self.train_blocks[mine].to(env.device)  # (b, T)
            cached = None if self.cache is None else [t.to(env.device) for t in self.cache.rows(mine)]
            sync = micro == cfg.grad_accum - 1 or env.mode != "ddp"
            with (nullcontext() if sync else self.wrapped.no_sync()), self.autocast():
                out = self.wrapped(x, cached=cached)
                (out["loss"] / cfg.grad_accum).backward()
            acc += torch.stack([out[k].detach().float() for k in _KEYS]) / cfg.grad_accum
        vals = dict(zip(_KEYS, D.all_mean(acc, env.world).cpu().tolist()))
        if not math.isfinite(vals["loss"]):
            last = last_good_checkpoint(self.out_dir)  # hashes checked: never a corrupted one
            raise NonFiniteLossError(
                f"non-finite training loss ({vals['loss']}) at step {self.step + 1} (kd={vals['kd_loss']}, "
                f"ce={vals['ce_loss']}, is={vals['is_loss']}); stopped before the optimizer update. Last good "
                f"checkpoint: {last if last is not None else 'none'}. Lower lr, check the data, or use fp32."
            )
        grad_norm = None  # not measured without clipping
        if cfg.max_grad_norm:
            gn = torch.nn.utils.clip_grad_norm_([p for _, p in self.train_params], cfg.max_grad_norm)
            grad_norm = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        dt = time.perf_counter() - t0
        return {"split": "train", "step": self.step, **vals, "lr": lr, "grad_norm": grad_norm,
                "tokens": self.step * tokens_per_step, "tokens_per_s": tokens_per_step / max(dt, 1e-9)}

    def run(self, resumed: tuple[Path, dict, dict] | None = None) -> nn.Module:
        """Resume or seed, train to ``cfg.steps`` (logging, evaluating, saving), save ``final``; returns the student."""
        cfg = self.cfg
        bar = None
        try:
            self.resume(resumed)
            if self.env.is_main and cfg.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", dynamic_ncols=True)
            if self.eval_blocks is not None and self.step == 0 and cfg.steps > 0:  # baseline before training
                self.log(self.evaluate())
            while self.step < cfg.steps:
                row = self.train_step()
                if self.step % max(1, cfg.log_every) == 0:
                    self.log(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                last_step = self.step == cfg.steps
                if self.eval_blocks is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last_step):
                    ev = self.evaluate()
                    self.log(ev)
                    row.update({f"eval_{k}": v for k, v in ev.items() if k not in ("split", "step")})
                    self.plot()
                if (cfg.save_every and self.step % cfg.save_every == 0) or last_step:
                    self.save()
                for cb in self.callbacks:
                    cb(self.step, row, self.student)
            if bar is not None:
                bar.close()
                bar = None
            self.save_final()
        finally:
            if bar is not None:
                bar.close()
            self.module.remove_hooks()
        self.student.eval()
        return self.student
