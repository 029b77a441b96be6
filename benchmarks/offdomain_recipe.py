"""Which pruning calibration and recipe recover general English best: equal steps, three held-out texts.

The teacher SmolLM2-135M-Instruct is pruned to half its parameters (``minitron.prune(params=0.5)``, 64
calibration blocks) with calibration drawn from the Python manual (``pydoc``, what ``minitron prune``
uses by default), from the House of Commons speeches (``commons``), half from each (``mix``) or the first
blocks of a built-in data name (``builtin-mix``: the three texts interleaved in proportion), then distilled
for the same number of steps on the manual + speeches (``mix2``, the built-in job's text before the
Wikipedia articles were added) or on all three texts (``mix3``, ``builtin-mix``) with the built-in job's
recipe (8 x 256 tokens per step, cosine to lr/10, the library's default precision and loss). Perplexity is
measured right after pruning and after training on the first blocks of the held-out texts: the manual's, the
speeches' and the articles' held-out splits, and an off-domain text kept outside the repo
(``benchmarks/offdomain_news.py`` writes one). Rows compare at equal steps and tokens, so they hold on a
loaded machine; wall times are recorded with the load average.

Usage (results in benchmarks/results/offdomain_recipe.{md,json}; rows are added as they finish)::

    python benchmarks/offdomain_recipe.py --offdomain /tmp/news40.txt pydoc:pydoc:8e-4:60:mix2 mix:mix:8e-4:60:mix2
    # name:calibration:lr:steps:train (steps 0 = score right after pruning only)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, md_table, write_result  # noqa: E402

CALIBRATION = {"pydoc": {"pydoc": 64}, "commons": {"commons": 64}, "mix": {"pydoc": 32, "commons": 32},
               "thirds": {"pydoc": 22, "commons": 21, "wiki": 21}}
"""Blocks of each built-in text in the 64 calibration blocks."""


TRAIN = {"mix2": ("pydoc", "commons"), "mix3": ("pydoc", "commons", "wiki")}


def calibration_blocks(kind: str, tokenizer, seq_len: int = 256) -> torch.Tensor:
    from minitron.data import builtin_documents, load_text_blocks
    from minitron.models import text_source

    if kind not in CALIBRATION:
        return load_text_blocks(text_source(kind), tokenizer, seq_len, 64)

    return torch.cat([load_text_blocks(builtin_documents("train", (corpus,)), tokenizer, seq_len, n)
                      for corpus, n in CALIBRATION[kind].items()])


def main(argv: list[str] | None = None) -> int:
    import minitron
    from minitron.data import builtin_documents, load_text_blocks
    from minitron.distillation import DistillConfig
    from minitron.models import load_model, text_source
    from minitron.pruner import pruning_summary

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="name:calibration:lr:steps:train")
    p.add_argument("--offdomain", required=True, help="held-out text outside the repo")
    p.add_argument("--eval-blocks", type=int, default=24, help="first blocks of each held-out text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "offdomain_recipe"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, tok = load_model("smollm2-135m")
    sets = {"manual": load_text_blocks(builtin_documents("valid", ("pydoc",)), tok, 256)[:args.eval_blocks],
            "Commons": load_text_blocks(builtin_documents("valid", ("commons",)), tok, 256)[:args.eval_blocks],
            "Wikipedia": load_text_blocks(builtin_documents("valid", ("wiki",)), tok, 256)[:args.eval_blocks],
            "off-domain": load_text_blocks(args.offdomain, tok, 256)[:args.eval_blocks]}
    out = Path(args.out)
    res_path = out.with_suffix(".json")
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res.setdefault("teacher", {})
    for k, b in sets.items():
        if k not in res["teacher"]:
            res["teacher"][k] = minitron.perplexity(teacher, b, 8)
    for spec in args.runs:
        name, calib, lr, steps, train_name = spec.split(":")
        if name in res:
            continue
        lr, steps = float(lr), int(steps)
        t0 = time.time()
        student = minitron.prune(teacher, calibration_blocks(calib, tok), params=0.5, verbose=False, progress=False)
        row = {"calibration": calib, "lr": lr, "steps": steps, "train": train_name, "load_before": os.getloadavg()[0],
               "shape": pruning_summary(minitron.count_parameters(teacher), student).split("; ", 1)[1],
               "pruned": {k: minitron.perplexity(student, b, 8) for k, b in sets.items()}}
        if steps:
            cfg = DistillConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(2, steps // 20), seq_len=256,
                                batch_size=8, output_dir=f"out/bench-offdomain-recipe/{name}", save_every=None,
                                eval_every=None, progress=False, plot=False, overwrite=True, resume=False)
            t1 = time.time()
            train = load_text_blocks(builtin_documents("train", TRAIN[train_name]), tok, 256)
            student = minitron.distill(student, teacher, train, None, config=cfg, tokenizer=tok)
            row["train_s"] = time.time() - t1
            row["after"] = {k: minitron.perplexity(student, b, 8) for k, b in sets.items()}
        row.update(tokens=steps * 8 * 256, wall_s=time.time() - t0, load_after=os.getloadavg()[0])
        res[name] = row
        print(name, json.dumps(row), flush=True)
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(res, indent=1) + "\n")
    t = res["teacher"]
    rows = []
    for k, v in res.items():
        if k == "teacher":
            continue
        cells = [k, v["calibration"], v.get("train", "mix2"), f"{v['lr']:g}", v["steps"], v["shape"]]
        for s in t:
            cells.append(f"{v['pruned'][s]:.0f}" if s in v["pruned"] else "-")
        for s in t:
            a = v.get("after", {}).get(s)
            cells.append("-" if a is None else f"{a:.1f} ({a / t[s]:.2f}x)")
        cells += [f"{v['wall_s'] / 60:.1f} min", f"{v['load_before']:.2f} / {v['load_after']:.2f}"]
        rows.append(cells)
    head = ["run", "calibration", "train", "lr", "steps", "shape"] + [f"pruned {s}" for s in t] + [f"after {s}" for s in t] \
        + ["wall", "load before/after"]
    write_result(out.with_suffix(".md"),
                 f"Pruning calibration and recipe vs recovery off the training domain. SmolLM2-135M-Instruct -> "
                 f"`prune(params=0.5)` (64 calibration blocks), distilled with 8 x 256 tokens per step. "
                 f"Perplexity on the first {args.eval_blocks} blocks of 256 tokens of each held-out text; teacher: "
                 + ", ".join(f"{s} {v:.2f}" for s, v in t.items()) + ".\n\n"
                 + md_table(head, rows, "l" * 6 + "r" * (len(head) - 6))
                 + "\n\nCommand: `python benchmarks/offdomain_recipe.py --offdomain NEWS "
                 + " ".join(f"{k}:{v['calibration']}:{v['lr']:g}:{v['steps']}:{v.get('train', 'mix2')}" for k, v in res.items() if k != "teacher")
                 + f"` ({args.threads} threads)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
