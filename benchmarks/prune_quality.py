"""Perplexity of the built-in model before/after pruning: importance vs random, width vs depth.

One calibration (training split of the built-in corpus) serves every target; perplexity is
measured on the held-out split the model never saw. Random baselines prune to the exact same
shape with uniformly random channels/heads/neurons/layers (mean of 3 seeds).

    python benchmarks/prune_quality.py [--out benchmarks/results/prune_quality_builtin.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import minitron
from minitron.models import load_model
from minitron.data import builtin_text, load_text_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune_quality_builtin.md"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()

    model, tok = load_model("builtin-tiny")
    calib = load_text_blocks([builtin_text("train")], tok, args.seq_len, args.num_samples)
    valid = load_text_blocks([builtin_text("valid")], tok, args.seq_len)
    scores = minitron.collect_importance(model, calib, minitron.ImportanceConfig(depth_ppl=True, ppl_max_blocks=64, head_output=True))
    c = model.config
    width = minitron.target_for_budget(model, 0.5)
    rows = [("original", c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers,
             minitron.count_parameters(model), minitron.perplexity(model, valid), None)]

    def add(name: str, target: minitron.Target, depth_metric: str = "bi", random: bool = True) -> None:
        pruned = minitron.prune(model, target=target, scores=scores, depth_metric=depth_metric, verbose=False)
        rand = None
        if random:
            rand = statistics.mean(
                minitron.perplexity(minitron.prune(model, target=target, method="random", seed=s, verbose=False), valid)
                for s in range(3)
            )
        p = pruned.config
        rows.append((name, p.hidden_size, p.intermediate_size, p.num_attention_heads, p.num_hidden_layers,
                     minitron.count_parameters(pruned), minitron.perplexity(pruned, valid), rand))

    add("width, `--params 0.5` (hidden+FFN)", width)
    add("hidden only", minitron.Target(hidden_size=c.hidden_size // 2))
    add("FFN only", minitron.Target(intermediate_size=c.intermediate_size // 2))
    add("heads only (half of each KV group)", minitron.Target(num_attention_heads=c.num_attention_heads // 2))
    depth = minitron.Target(num_hidden_layers=c.num_hidden_layers // 2)
    add("depth, Block Importance", depth, "bi")
    add("depth, perplexity", depth, "ppl", random=False)

    lines = [
        f"Built-in model (`minitron/assets/tiny-llama-pydoc`), held-out split: {valid.numel()} tokens; "
        f"calibration: {calib.shape[0]} x {calib.shape[1]} tokens of the training split. No retraining. "
        f"Random = same shape, random selection, mean of 3 seeds. ({time.time() - start:.0f} s on CPU)",
        "",
        "| pruning | hidden | FFN | heads | layers | params | ppl (importance) | ppl (random) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, h, f, nh, nl, n, ppl, rand in rows:
        lines.append(f"| {name} | {h} | {f} | {nh} | {nl} | {n / 1e6:.2f}M | {ppl:.1f} | "
                     f"{'-' if rand is None else f'{rand:.1f}'} |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
