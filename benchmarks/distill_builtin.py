"""Prune the built-in model, then recover it with knowledge distillation from the original.

Teacher: the built-in 7.3M-parameter Llama. Students: its width-pruned (``--params 0.5``) and
depth-pruned (half the layers, Block Importance) versions. Each is distilled with forward KL
(tau = 1, KD loss only: the Minitron recipe) on the training split for the same number of steps;
perplexity is measured on the held-out split before and after, next to the teacher's.

    python benchmarks/distill_builtin.py [--steps 200] [--out benchmarks/results/distill_builtin.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import minitron
from minitron.models import load_model
from minitron.data import builtin_text, load_text_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_builtin.md"))
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()

    teacher, tok = load_model("builtin-tiny")
    train = load_text_blocks([builtin_text("train")], tok, args.seq_len)
    valid = load_text_blocks([builtin_text("valid")], tok, args.seq_len)
    scores = minitron.collect_importance(teacher, train[:256], progress=False)
    students = {
        "width (`--params 0.5`)": minitron.prune(teacher, target=minitron.target_for_budget(teacher, 0.5), scores=scores,
                                                   norm_rescale=False),
        "depth (4 of 8 layers, BI)": minitron.prune(teacher, target=minitron.Target(num_hidden_layers=4), scores=scores,
                                                    depth_metric="bi"),
    }
    teacher_ppl = minitron.perplexity(teacher, valid)
    rows = []
    for name, student in students.items():
        before = minitron.perplexity(student, valid)
        with tempfile.TemporaryDirectory() as run_dir:
            config = minitron.DistillConfig(
                steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.steps // 10,
                seq_len=args.seq_len, batch_size=args.batch_size, output_dir=run_dir, save_every=0,
                eval_every=0, progress=False, plot=False, resume=False,
            )
            student = minitron.distill(student, teacher, train, None, config=config, tokenizer=tok)
        rows.append((name, minitron.count_parameters(student), before, minitron.perplexity(student, valid)))

    tokens = args.steps * args.batch_size * args.seq_len
    lines = [
        f"Built-in model as teacher ({minitron.count_parameters(teacher) / 1e6:.2f}M params, held-out perplexity "
        f"{teacher_ppl:.1f}). Distillation: forward KL, tau=1, KD only, {args.steps} steps x {args.batch_size} x "
        f"{args.seq_len} = {tokens / 1e6:.2f}M tokens (the teacher saw 1.23M tokens in training), "
        f"lr {args.lr} cosine. Perplexity on the held-out split. ({time.time() - start:.0f} s on CPU)",
        "",
        "| student | params | ppl after pruning | ppl after distillation | teacher ppl |",
        "|---|---|---|---|---|",
    ]
    for name, n, before, after in rows:
        lines.append(f"| {name} | {n / 1e6:.2f}M | {before:.1f} | {after:.1f} | {teacher_ppl:.1f} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
