"""The training loop of a distillation run (:class:`Trainer`), after :func:`minitron.distillation.distill`
checked the inputs and locked the run directory: resume, steps, evaluation, checkpoints, the time budget.
"""

from __future__ import annotations

import json
import math
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
from minitron.distillation.config import DistillConfig
from minitron.distillation.data import batch_indices
from minitron.distillation.metrics import append_row, truncated_text
from minitron.distillation.module import DistillModule, check_teacher_padding
from minitron.distillation.sharded_load import check_meta_teacher_padding
from minitron.distillation.optim import make_optimizer
from minitron.distillation.plotting import plot_loss_curve
from minitron.distillation.precision import choose_precision, frozen_in_bf16
from minitron.distillation.run_dir import METRICS, PLOT, RUN_FILE
from minitron.distillation import runtime
from minitron.distillation.runtime import physical_cores, warn
from minitron.distillation.teacher_cache import TeacherCache
from minitron.distillation.time_budget import TimeBudget
from minitron.outputs import write_output_dir
from minitron.atomic import fresh_temp_name
from minitron.owned import record_prefix, replace_owned, write_text_owned

__all__ = ["Callback", "NonFiniteLossError", "Trainer"]

Callback = Callable[[int, dict, nn.Module], None]


class NonFiniteLossError(ValueError, FloatingPointError):
    """The training loss became NaN/inf; the run stopped before the optimizer step."""


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
        use_bf16, why = choose_precision(cfg.mixed_precision, device)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
        # a frozen teacher in bf16 weights: single process only (DDP/FSDP own the parameters' storage)
        self.teacher_bf16 = use_bf16 and teacher is not None and env.world == 1 and env.mode == "none"
        self.run_notes = {"precision": "bf16" if use_bf16 else "fp32", "precision_reason": why,
                          "teacher_weights": "bf16" if self.teacher_bf16 else "as loaded",
                          "threads": torch.get_num_threads(), "physical_cores": physical_cores(),
                          "load_avg_1min": runtime.load_average()}
        self.budget: TimeBudget | None = None  # set by distill() when cfg.time_budget_s is given
        self.best_tok_s = 0.0

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
        staged = fresh_temp_name(self.out_dir, f".{PLOT}.tmp-")  # a crash leaves a temp name cleaned on resume
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
                "tokens": self.step * tokens_per_step, "tokens_per_s": tokens_per_step / max(dt, 1e-9), "step_s": dt}

    def timed(self, fn: Callable[[], Any], record: str) -> Any:
        """Run ``evaluate`` / ``save`` and give its duration to the time budget (``record_eval`` / ``record_save``)."""
        t0 = time.perf_counter()
        out = fn()
        if self.budget is not None:
            getattr(self.budget, record)(time.perf_counter() - t0)
        return out

    def rank0(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (a collective under torchrun): time-budget decisions must agree."""
        t = torch.tensor([value if self.env.is_main else 0.0], dtype=torch.float64, device=self.env.device)
        return float(D.all_sum(t, self.env.world).item())

    def note_step(self, row: dict, first: bool) -> None:
        """After a step: run notes on the first row, the time budget's LR plan, the collapse warning."""
        cfg, budget = self.cfg, self.budget
        if first:  # which precision ran and why, threads, load: the figures of this row can be judged
            row.update(self.run_notes)
        sched = self.scheduler.lr_lambdas[0]
        if budget is not None:
            budget.record_step(row["step_s"])
            if not sched.planned and self.step >= max(cfg.warmup_steps, 2) and self.step < cfg.steps:
                fit = budget.steps_that_fit(self.step, self.eval_blocks is not None)
                sched.plan(min(cfg.steps, int(self.rank0(float(fit)))))  # one horizon on every rank
                for g, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):  # the next step's LR
                    g["lr"] = base * sched(self.step)
                row["lr_horizon"] = sched.horizon
        tok_s = row["tokens_per_s"]
        load = runtime.load_average()  # a collapse (half the best tokens/s so far) on a loaded machine: it is shared
        if (self.step >= 3 and tok_s < 0.5 * self.best_tok_s and load is not None and load > physical_cores()
                and not self.run_notes.get("warned")):
            self.run_notes["warned"] = True
            row["warning"] = (f"tokens/s collapsed to {tok_s:.0f} from {self.best_tok_s:.0f} (load average "
                              f"{load:.1f}, {torch.get_num_threads()} threads on {physical_cores()} cores): "
                              "the machine is probably shared and these figures mean nothing"
                              + ("; try --threads 1" if torch.get_num_threads() > 1 else ""))
            warn(row["warning"])
        self.best_tok_s = max(self.best_tok_s, tok_s)

    def run(self, resumed: tuple[Path, dict, dict] | None = None) -> nn.Module:
        """Resume or seed, train to ``cfg.steps`` or until the time budget is spent (logging, evaluating,
        saving), save ``final``; returns the student."""
        cfg, budget = self.cfg, self.budget
        with_eval = self.eval_blocks is not None
        bar = None
        try:
            self.resume(resumed)
            saved_at, evaluated_at = (self.step if resumed is not None else None), None
            if self.env.is_main and cfg.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=cfg.steps, initial=self.step, desc="distill", dynamic_ncols=True)
            with frozen_in_bf16(self.teacher, self.teacher_bf16):
                if with_eval and self.step == 0 and cfg.steps > 0:  # baseline before training
                    self.log(self.timed(self.evaluate, "record_eval"))
                    evaluated_at = 0
                stopped, first = None, True
                while self.step < cfg.steps:
                    if budget is not None and self.rank0(float(not budget.fits_next(with_eval))):  # ranks agree
                        stopped = budget.stop_reason(self.step, with_eval)
                        break
                    row = self.train_step()
                    self.note_step(row, first)
                    first = False
                    if self.step % max(1, cfg.log_every) == 0:
                        self.log(row)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                    last_step = self.step == cfg.steps
                    if with_eval and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last_step):
                        ev = self.timed(self.evaluate, "record_eval")
                        evaluated_at = self.step
                        self.log(ev)
                        row.update({f"eval_{k}": v for k, v in ev.items() if k not in ("split", "step")})
                        self.plot()
                    if (cfg.save_every and self.step % cfg.save_every == 0) or last_step:
                        self.timed(self.save, "record_save")
                        saved_at = self.step
                    for cb in self.callbacks:
                        cb(self.step, row, self.student)
                if bar is not None:
                    bar.close()
                    bar = None
                if stopped is not None:  # the closing work of a full run, at the step reached
                    if with_eval and evaluated_at != self.step:
                        self.log(self.evaluate())
                    if saved_at != self.step:
                        self.save()
                    self.log({"split": "stop", "step": self.step, "reason": stopped})
                    if self.env.is_main:
                        print(f"minitron distill: stopped after step {self.step} of {cfg.steps}: {stopped}")
                self.save_final()
        finally:
            if bar is not None:
                bar.close()
            self.module.remove_hooks()
        self.student.eval()
        return self.student
