"""``minitron distill`` command line (also ``python -m minitron.distillation.cli``; works under ``torchrun``).

Example:
    python -m minitron.distillation.cli --student pruned/ --teacher llama/ --data train.jsonl \\
        --eval-data valid.jsonl --steps 1000 --seq-len 1024 --batch-size 8 --output-dir run/
    torchrun --nproc_per_node 8 -m minitron.distillation.cli ... --parallel fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from minitron.distillation.config import (
    DistillConfig,
    INTERMEDIATE_LOSSES,
    LOGITS_LOSSES,
    LOSS_IMPLS,
    MIXED_PRECISION,
    PARALLEL,
)

_CHOICES = {"logits_loss": LOGITS_LOSSES, "intermediate_loss": INTERMEDIATE_LOSSES, "mixed_precision": MIXED_PRECISION,
            "loss_impl": LOSS_IMPLS, "parallel": PARALLEL}
_SKIP = {"intermediate_layers", "adam_betas", "extra", "resume", "progress", "plot", "overwrite"}
_OPTIONAL_INT = {"top_k", "save_every", "eval_every", "eval_batches", "keep_checkpoints"}


def _pairs(text: str) -> list[tuple[int, int]]:
    """``"0:1,2:3"`` -> ``[(0, 1), (2, 3)]``."""
    try:
        return [tuple(int(v) for v in p.split(":")) for p in text.split(",") if p.strip()]  # type: ignore[misc]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--intermediate-layers wants 'student:teacher,...', got {text!r}") from e


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, help="local path of the student HF checkpoint")
    p.add_argument("--teacher", required=True, help="local path of the teacher HF checkpoint")
    p.add_argument("--data", required=True, help=".txt / .jsonl (field 'text') / .pt (LongTensor of token ids)")
    p.add_argument("--eval-data", default=None)
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the student path)")
    p.add_argument("--no-resume", action="store_true", help="start over even if output_dir/latest exists "
                   "(discards that run's checkpoints and metrics)")
    p.add_argument("--overwrite", action="store_true", help="allow --output-dir to be a non-empty directory not "
                   "written by minitron distill: the run's files are added, nothing else is touched")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--intermediate-layers", type=_pairs, default=None, help="e.g. '3:6,7:14' (student:teacher)")
    for f in dataclasses.fields(DistillConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in _OPTIONAL_INT:
            p.add_argument(flag, type=int, default=f.default)
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
    """Build the :class:`DistillConfig` from parsed arguments."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
          if f.name not in _SKIP and hasattr(args, f.name)}
    return DistillConfig(**kw, intermediate_layers=args.intermediate_layers, resume=not args.no_resume,
                         progress=not args.no_progress, plot=not args.no_plot, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    """Load student/teacher/tokenizer from local paths and run :func:`minitron.distillation.distill`.

    Returns:
        Exit status 0 (errors raise).
    """
    from pathlib import Path

    from minitron.local import load_causal_lm, load_tokenizer, require_local_dir
    from minitron.outputs import check_output_dir
    from minitron.distillation.trainer import distill

    cfg = config_from_args(args)
    for flag, path in (("--student", args.student), ("--teacher", args.teacher), ("--tokenizer", args.tokenizer)):
        if path is not None:
            require_local_dir(path, flag)  # never a hub id: nothing is downloaded
    check_output_dir(cfg.output_dir, "distill", inputs=[args.student, args.teacher, args.tokenizer, args.data,
                                                        args.eval_data], overwrite=cfg.overwrite, flag="--output-dir")
    student = load_causal_lm(args.student, "--student")
    teacher = load_causal_lm(args.teacher, "--teacher")
    tok_path = args.tokenizer or args.student
    tokenizer = None
    if args.tokenizer or any((Path(tok_path) / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = load_tokenizer(tok_path, "--tokenizer" if args.tokenizer else "--student")
    teacher_tokenizer = None
    if tokenizer is not None and (Path(args.teacher) / "tokenizer_config.json").exists():
        teacher_tokenizer = load_tokenizer(args.teacher, "--teacher")
    distill(student, teacher, args.data, args.eval_data, config=cfg, tokenizer=tokenizer,
            teacher_tokenizer=teacher_tokenizer)
    print(f"distilled student written to {Path(cfg.output_dir) / 'final'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m minitron.distillation.cli ...``."""
    parser = argparse.ArgumentParser(prog="minitron-distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
