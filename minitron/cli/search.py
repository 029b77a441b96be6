"""``minitron search``: architecture search within a parameter budget (prune + short KD per candidate).

With no arguments: the built-in 7M model at 50% of its parameters, retraining the 4 best
candidates for 50 steps each (a few minutes on CPU). The search itself is :func:`minitron.search`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..arch_search import ALL_AXES
from ..models import BUILTIN_TINY
from .common import BUILTIN, add_model_arguments, default_device, input_paths, non_negative_int, positive_int, text_source

def api(name: str, shown: str | None = None) -> str:
    """`` (Python API: SearchConfig.<name> = <default>)``: where the command's default differs from the API's."""
    from dataclasses import fields

    from ..arch_search import SearchConfig

    default = next(f.default for f in fields(SearchConfig) if f.name == name)
    return f" (minitron.SearchConfig's default: {shown or default}; this command's is sized for a CPU run)"


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``search`` subcommand to an argparse ``subparsers`` object.

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.
    Returns:
        The new sub-parser (its ``func`` default is :func:`run`).
    Example:
        >>> register(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "search", help="architecture search within a parameter budget (prune + short KD per candidate)",
        description="Minitron architecture search. With no arguments: the built-in model at 50%% of its parameters, "
                    "retraining the 4 best candidates for 50 steps each (a few minutes on CPU). Defaults that differ "
                    "from minitron.SearchConfig's are named in each flag's help.")
    add_model_arguments(p, BUILTIN_TINY, what="model to search (default: the 7M built-in model, minutes on CPU; "
                        "smollm2-135m takes hours there)")
    p.add_argument("--data", "--calib", dest="data", default=BUILTIN, help=".txt/.jsonl calibration text (default: "
                   "built-in corpus; --calib: deprecated alias)")
    p.add_argument("--train-data", "--train", dest="train_data", default=BUILTIN, help=".txt/.jsonl retraining text "
                   "(default: built-in corpus; --train: deprecated alias)")
    p.add_argument("--eval-data", "--eval", dest="eval_data", default=None, help=".txt/.jsonl validation text "
                   "(default: the built-in held-out split for the built-in model, else the tail of --train-data; "
                   "--eval: deprecated alias)")
    p.add_argument("--output-dir", "--out", dest="output_dir", default="out/minitron-search", help="output directory "
                   "(a new or empty directory, or a previous `minitron search` output; --out: deprecated alias)")
    p.add_argument("--overwrite", action="store_true", help="allow --output-dir to be a non-empty directory not "
                   "written by minitron search: the search's files replace same-named ones, nothing else is deleted")
    p.add_argument("--params", type=float, default=0.5, help="budget: a fraction in (0, 1] or an absolute count "
                   "(values > 1 are counts)")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--retrain-steps", type=non_negative_int, default=50, help=f"distillation steps per retrained "
                   f"candidate{api('retrain_steps')}")
    p.add_argument("--top", type=non_negative_int, default=4,
                   help=f"retrain this many best-after-pruning candidates (0 = all){api('top', 'all')}")
    p.add_argument("--axes", default=None, help="comma-separated subset of hidden,ffn,heads,layers and, on "
                   "mixture-of-experts models, experts,expert_ffn,shared_ffn, or the minitron.Target fields they "
                   "stand for (hidden_size, intermediate_size, num_attention_heads, ...; the README's table) "
                   "(default: every axis the model has; Mixtral's ffn is its expert_ffn)")
    p.add_argument("--max-width-prune", type=float, default=0.4)
    p.add_argument("--max-depth-prune", type=float, default=0.2)
    for axis in ALL_AXES:
        p.add_argument(f"--{axis.replace('_', '-')}-divisor", type=positive_int, default=None, help=f"grid step of {axis}")
    p.add_argument("--seq-len", type=positive_int, default=128, help=f"tokens per block{api('seq_len', '256')}")
    p.add_argument("--num-samples", type=positive_int, default=64, help=f"calibration blocks{api('num_samples')}")
    p.add_argument("--eval-blocks", type=positive_int, default=32, help=f"validation blocks{api('eval_blocks')}")
    p.add_argument("--batch-size", type=positive_int, default=4, help=f"blocks per batch{api('batch_size')}")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss-impl", default="auto", choices=("auto", "triton", "chunked", "naive"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-scores", help="reuse importance statistics instead of calibrating")
    p.add_argument("--device", default=default_device())
    p.add_argument("--threads", type=non_negative_int, default=None, help="torch CPU threads (default: 1 for the built-in model "
                   "on CPU, which is tiny and much faster so on a shared CPU; else torch's default; 0 = torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``minitron search``; prints the candidate table and writes ``args.output_dir``.

    Returns:
        Exit status 0 (errors raise ValueError, reported by ``minitron.cli.main``).
    """
    from ..arch_search import SearchConfig, search
    from ..arch_search.report import SEARCH_OUTPUTS
    from ..distillation import DistillConfig
    from ..importance.collect import ImportanceScores
    from ..models import load_model
    from ..outputs import check_output_dir
    from ..validate import check_device

    check_device(args.device)
    check_output_dir(args.output_dir, "search", inputs=input_paths(args.model, args.model_gguf, args.data,
                                                                    args.train_data, args.eval_data, args.load_scores),
                     overwrite=args.overwrite, writes=SEARCH_OUTPUTS, flag="--output-dir")
    tiny = args.model == BUILTIN_TINY and args.model_gguf is None
    threads = args.threads if args.threads is not None else (1 if tiny and args.device == "cpu" else 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer = load_model(args.model, gguf_file=args.model_gguf, device=args.device)
    train = text_source(args.train_data)
    eval_data = (text_source(BUILTIN, "valid") if args.eval_data is None and args.train_data == BUILTIN
                 else args.eval_data)
    divisors = {a: getattr(args, f"{a}_divisor") for a in ALL_AXES if getattr(args, f"{a}_divisor")}
    distill_config = DistillConfig(steps=max(args.retrain_steps, 1), lr=args.lr, min_lr=args.lr / 10,
                                   warmup_steps=max(1, args.retrain_steps // 10), seq_len=args.seq_len,
                                   batch_size=args.batch_size, save_every=None, eval_every=None,
                                   keep_checkpoints=1, plot=False, seed=args.seed, loss_impl=args.loss_impl)
    config = SearchConfig(
        tolerance=args.tolerance, retrain_steps=args.retrain_steps, top=args.top or None, divisors=divisors,
        max_width_prune=args.max_width_prune, max_depth_prune=args.max_depth_prune,
        axes=None if args.axes is None else tuple(a.strip().replace("-", "_") for a in args.axes.split(",") if a.strip()),
        seed=args.seed, seq_len=args.seq_len,
        num_samples=args.num_samples, eval_blocks=args.eval_blocks, batch_size=args.batch_size, distill=distill_config)
    result = search(
        model, text_source(args.data), train, params=args.params, config=config, eval_data=eval_data,
        tokenizer=tokenizer, scores=ImportanceScores.load(args.load_scores) if args.load_scores else None,
        output_dir=args.output_dir, overwrite=args.overwrite, progress=not args.no_progress)
    print(result.markdown())
    print(f"best: {result.best.name} ({result.best.params:,} parameters) -> {result.files['best']} "
          f"({result.seconds:.0f} s)")
    print(json.dumps({"best": result.best.name, "params": result.best.params,
                      "loss_pruned": round(result.best.loss_pruned, 4),
                      "loss_retrained": None if result.best.loss_retrained is None else round(result.best.loss_retrained, 4),
                      "files": result.files, "seconds": result.seconds, "timings": result.timings}))
    return 0
