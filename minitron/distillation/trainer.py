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

import time
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from minitron.distillation import distributed as D
from minitron.distillation.checks import check_models, check_vocab, local_dir
from minitron.data import resolve_seq_len
from minitron.distillation.config import DEFAULT_DISTILL_SEQ_LEN, DistillConfig
from minitron.distillation.data import check_nonempty, load_blocks, resolve_tokenizer
from minitron.distillation.loop import Callback, NonFiniteLossError, Trainer
from minitron.distillation.module import TEACHER_OUTSIDE_MASS_LIMIT
from minitron.distillation.runtime import default_threads, oversubscription_warning, torch_threads, warn
from minitron.distillation.time_budget import TimeBudget
from minitron.distillation.run_dir import check_run_dir, load_resumable, open_run_dir, run_fingerprint, start_over
from minitron.distillation.teacher_cache import TeacherCache, as_teacher_cache, check_cached_run
from minitron.losses import check_impl_device

__all__ = ["Callback", "NonFiniteLossError", "TEACHER_OUTSIDE_MASS_LIMIT", "Trainer", "distill"]



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
    started = time.perf_counter()  # the time budget counts from here
    cfg = config if config is not None else DistillConfig()
    if overrides:
        cfg = DistillConfig(**{**cfg.to_dict(), **overrides})
    with torch_threads(cfg.threads or default_threads()) as threads:
        if (busy := oversubscription_warning(threads)) is not None:
            warn(busy)
        return _distill(student, teacher, train_data, eval_data, cfg, tokenizer, teacher_tokenizer, callbacks, started)


def _distill(student: nn.Module, teacher: Any, train_data: Any, eval_data: Any, cfg: DistillConfig, tokenizer: Any,
             teacher_tokenizer: Any, callbacks: Sequence[Callback] | None, started: float) -> nn.Module:
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
        if cfg.time_budget_s is not None:
            trainer.budget = TimeBudget(cfg.time_budget_s, start=started)
        return trainer.run(resumed)
    finally:
        if lock is not None:
            lock.release()


