"""Configuration of a distillation run (:class:`DistillConfig`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

LOGITS_LOSSES = ("forward_kl", "reverse_kl", "jsd")
INTERMEDIATE_LOSSES = ("mse", "cosine")
MIXED_PRECISION = ("auto", "bf16", "fp32", "no")
LOSS_IMPLS = ("auto", "triton", "chunked", "naive")
PARALLEL = ("auto", "none", "ddp", "fsdp")
DEFAULT_DISTILL_SEQ_LEN = 1024  # training blocks when neither the user nor the data sets a length


@dataclass
class DistillConfig:
    """Hyper-parameters of :func:`minitron.distillation.distill`.

    Defaults follow the Minitron recipe (docs/method.md section 4): forward KL at tau = 1,
    KD loss only (``clm_weight=0``), LR 1e-4 -> 1e-5 cosine with 100 warmup steps.

    Args:
        steps: optimizer steps to train (the run ends at global step ``steps``).
        lr: peak learning rate (reached after ``warmup_steps`` of linear warmup).
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup steps from 0 to ``lr``.
        seq_len: tokens per training block. None (default): a 2-D token-id tensor ``(B, S)`` of training
            data is used as B blocks of S tokens; other data is packed into blocks of
            ``DEFAULT_DISTILL_SEQ_LEN`` (1024) tokens, fewer when a model's ``max_position_embeddings`` is smaller.
        batch_size: sequences per micro-step summed over all ranks (the global micro-batch);
            each of ``world_size`` ranks gets a disjoint ``batch_size // world_size`` of it.
        grad_accum: micro-steps per optimizer step (global batch = batch_size * grad_accum sequences).
        logits_loss: ``"forward_kl"`` (KL(teacher || student)), ``"reverse_kl"`` or ``"jsd"``.
        jsd_beta: mixture weight of the JSD, in [0, 1] (see :mod:`minitron.losses`).
        temperature: softmax temperature tau of both distributions (loss scaled by tau^2).
        top_k: if set, KL over the teacher's top-k tokens only (renormalised).
        clm_weight: weight of the next-token cross-entropy on the data (0 = KD only).
        kd_weight: weight of the logits KD loss (+ the scaled intermediate loss).
        intermediate_layers: ``[(student_layer, teacher_layer), ...]`` decoder-layer indices whose
            outputs are matched through a learned ``Linear(h_s, h_t)`` each; None = logits only.
        intermediate_loss: ``"mse"`` or ``"cosine"`` (1 - cosine similarity).
        output_dir: run directory: checkpoints/, latest, final/, metrics.jsonl, loss_curve.png,
            minitron_run.json (never a Hugging Face file name, so a run never clobbers a checkpoint).
            It must be new, empty or a previous distillation run, and must not be, hold or lie inside
            the student/teacher directories or the data (see ``overwrite``).
        save_every: checkpoint every this many optimizer steps (0/None = only at the end).
        eval_every: evaluate every this many steps (0/None = only at the end, if eval data given).
        eval_batches: at most this many eval micro-batches per evaluation (None = all).
        keep_checkpoints: keep only the newest N >= 1 step checkpoints (None = keep all).
        resume: continue the run saved in ``output_dir`` if there is one. It must be the same run:
            same config (except steps and bookkeeping fields such as save_every, progress), same
            student/teacher shapes and the same training data; anything else raises a ValueError
            (use another ``output_dir``, or ``resume=False`` to discard that run and start over).
        overwrite: allow an ``output_dir`` that is a non-empty directory not written by a
            distillation run; the run's files are added to it and nothing else is touched.
        seed: seed of the student-side RNG and of the data order (a function of seed and step).
        max_grad_norm: gradient clipping norm (None/0 = no clipping).
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        adam_betas: AdamW betas.
        mixed_precision: ``"auto"`` (bf16 on CUDA with bf16 support and on CPUs with native bf16, AMX-BF16 or
            AVX512-BF16, read from /proc/cpuinfo; fp32 elsewhere), ``"bf16"``, or ``"fp32"`` / ``"no"`` (all fp32).
            bf16 = ``torch.autocast`` for the forward/backward of teacher and student, fp32 master weights,
            gradients and AdamW state, the frozen teacher's weights held in bf16 for the run (restored after);
            the first metrics row says which precision ran and why (see :mod:`minitron.distillation.precision`).
        loss_impl: ``impl`` passed to :func:`minitron.losses.linear_kd_loss`.
        ce_chunk_size: tokens per chunk of the chunked cross-entropy (the CLM term).
        chat_template: render plain-text training/eval documents with the tokenizer's chat template
            (one assistant turn each; see :mod:`minitron.data`), for chat / instruct models.
        parallel: ``"auto"`` (DDP when torch.distributed is initialised / WORLD_SIZE > 1),
            ``"none"``, ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard`` on student and teacher layers).
        log_every: write a metrics row every this many steps.
        threads: torch intra-op threads for the run (restored afterwards). None (default): the physical cores
            this process may use (affinity mask, hyper-thread siblings counted once, cgroup quota; see
            :func:`minitron.distillation.runtime.physical_cores`), divided among the ``LOCAL_WORLD_SIZE`` ranks of
            a ``torchrun`` on this machine. A warning is given when the 1-minute load
            average exceeds those cores at the start, or when tokens/s collapses during the run.
        time_budget_s: wall-clock seconds for the run, counted from the call to ``distill``: between steps, a
            step is started only if it and the closing checkpoint + ``final/`` are predicted to fit; the run
            then stops cleanly (resumable, like any run). The cosine schedule is laid out over the steps
            predicted to fit or ``steps``, whichever is smaller (see :mod:`minitron.distillation.time_budget`).
            None: no budget.
        progress: show a tqdm progress bar (rank 0 only).
        plot: write ``loss_curve.png`` after each evaluation and at the end.
    """

    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    seq_len: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    logits_loss: str = "forward_kl"
    jsd_beta: float = 0.5
    temperature: float = 1.0
    top_k: int | None = None
    clm_weight: float = 0.0
    kd_weight: float = 1.0
    intermediate_layers: list[tuple[int, int]] | None = None
    intermediate_loss: str = "mse"
    output_dir: str = "run/"
    save_every: int | None = 500
    eval_every: int | None = 500
    eval_batches: int | None = None
    keep_checkpoints: int | None = 3
    resume: bool = True
    seed: int = 0
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    mixed_precision: str = "auto"
    loss_impl: str = "auto"
    ce_chunk_size: int = 1024
    chat_template: bool = False
    parallel: str = "auto"
    log_every: int = 1
    threads: int | None = None
    time_budget_s: float | None = None
    progress: bool = True
    plot: bool = True
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"DistillConfig: {msg}")

        def count(name: str, low: int, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
            need(ok, f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")
            setattr(self, name, int(value))

        for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                          ("seed", 0), ("log_every", 1), ("ce_chunk_size", 1)):
            count(name, low)
        for name, low in (("seq_len", 2), ("top_k", 1), ("threads", 1), ("save_every", 0), ("eval_every", 0), ("eval_batches", 1),
                          ("keep_checkpoints", 1)):
            count(name, low, optional=True)
        for name in ("lr", "min_lr", "jsd_beta", "temperature", "clm_weight", "kd_weight", "weight_decay"):
            need(isinstance(getattr(self, name), numbers.Real) and math.isfinite(getattr(self, name)),
                 f"{name} must be a finite number, got {getattr(self, name)!r}")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        need(self.max_grad_norm is None or (isinstance(self.max_grad_norm, numbers.Real) and self.max_grad_norm >= 0
                                            and math.isfinite(self.max_grad_norm)),
             f"max_grad_norm must be a finite number >= 0 or None, got {self.max_grad_norm!r}")
        need(self.time_budget_s is None or (isinstance(self.time_budget_s, numbers.Real)
                                            and not isinstance(self.time_budget_s, bool)
                                            and math.isfinite(self.time_budget_s) and self.time_budget_s > 0),
             f"time_budget_s must be a number of seconds > 0 or None, got {self.time_budget_s!r}")
        need(self.logits_loss in LOGITS_LOSSES, f"logits_loss={self.logits_loss!r}; allowed: {', '.join(LOGITS_LOSSES)}")
        need(self.intermediate_loss in INTERMEDIATE_LOSSES,
             f"intermediate_loss={self.intermediate_loss!r}; allowed: {', '.join(INTERMEDIATE_LOSSES)}")
        need(self.mixed_precision in MIXED_PRECISION,
             f"mixed_precision={self.mixed_precision!r}; allowed: {', '.join(MIXED_PRECISION)}")
        need(self.loss_impl in LOSS_IMPLS, f"loss_impl={self.loss_impl!r}; allowed: {', '.join(LOSS_IMPLS)}")
        need(self.parallel in PARALLEL, f"parallel={self.parallel!r}; allowed: {', '.join(PARALLEL)}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 <= self.jsd_beta <= 1, f"jsd_beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {self.jsd_beta}")
        need(self.clm_weight >= 0 and self.kd_weight >= 0 and (self.clm_weight > 0 or self.kd_weight > 0),
             f"need clm_weight >= 0, kd_weight >= 0, not both 0; got {self.clm_weight}, {self.kd_weight}")
        if self.intermediate_layers is not None:
            pairs = [tuple(int(i) for i in p) for p in self.intermediate_layers]
            need(len(pairs) > 0 and all(len(p) == 2 for p in pairs),
                 "intermediate_layers must be a non-empty list of (student_layer, teacher_layer) pairs or None")
            self.intermediate_layers = pairs  # type: ignore[assignment]
            need(self.kd_weight > 0, "intermediate_layers needs kd_weight > 0 (L_is is scaled by the logits loss)")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of the config."""
        d = asdict(self)
        if d["intermediate_layers"] is not None:
            d["intermediate_layers"] = [list(p) for p in d["intermediate_layers"]]
        d["adam_betas"] = list(d["adam_betas"])
        return d
