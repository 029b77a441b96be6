"""Recipe probe of the built-in distillation job: held-out perplexity after equal steps, per learning rate.

The teacher SmolLM2-135M-Instruct is pruned to half its parameters (``minitron.prune(params=0.5)``,
64 calibration blocks of the built-in text) and distilled from the teacher for the same number of steps
with each recipe (forward KL, cosine to lr/10, warmup steps/20); perplexity is measured on the whole
built-in held-out split. Comparisons are at equal steps and tokens, so they hold on a loaded machine;
wall times do not (the load average is recorded beside them).

Usage (results in benchmarks/results/distill_recipe.{md,json}; rows are added as they finish)::

    python benchmarks/distill_recipe.py lr2e-4:2e-4:40:4 lr8e-4:8e-4:40:4 lr2e-3:2e-3:40:4   # name:lr:steps:batch
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, md_table, write_result  # noqa: E402


def main(argv: list[str]) -> int:
    import minitron
    from minitron.data import builtin_text, load_text_blocks
    from minitron.distillation import DistillConfig
    from minitron.models import load_model

    torch.set_num_threads(int(os.environ.get("THREADS", 1)))
    work = Path(os.environ.get("WORK", "out/bench-distill-recipe"))
    seq = int(os.environ.get("S", 256))
    teacher, tok = load_model("smollm2-135m")
    train = load_text_blocks([builtin_text("train")], tok, seq)  # (n, S)
    valid = load_text_blocks([builtin_text("valid")], tok, 256)  # held out, never trained on
    calib = load_text_blocks([builtin_text("train")], tok, 256, 64)
    res_path = RESULTS / "distill_recipe.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    res.setdefault("teacher", minitron.perplexity(teacher, valid, 8))
    for spec in argv:
        name, lr, steps, bs = spec.split(":")
        if name in res:
            continue
        lr, steps, bs = float(lr), int(steps), int(bs)
        student = minitron.prune(teacher, calib, params=0.5, verbose=False, progress=False)
        before = minitron.perplexity(student, valid, 8)
        t0 = time.time()
        cfg = DistillConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(2, steps // 20), seq_len=seq,
                            batch_size=bs, output_dir=str(work / name), save_every=None, eval_every=None,
                            progress=False, plot=False, overwrite=True, resume=False)
        student = minitron.distill(student, teacher, train, None, config=cfg, tokenizer=tok)
        after = minitron.perplexity(student, valid, 8)
        res[name] = dict(lr=lr, steps=steps, bs=bs, S=seq, before=before, after=after, ratio=after / res["teacher"],
                         tokens=steps * bs * seq, wall=time.time() - t0, load=os.getloadavg())
        print(name, res[name], flush=True)
        RESULTS.mkdir(exist_ok=True)
        res_path.write_text(json.dumps(res, indent=1) + "\n")
    rows = [[k, f"{v['lr']:g}", v["steps"], f"{v['bs']} x {v['S']}", v["tokens"], f"{v['before']:.1f}",
             f"{v['after']:.2f}", f"{v['ratio']:.2f}", f"{v['wall'] / 60:.1f} min", f"{v['load'][0]:.1f}"]
            for k, v in res.items() if k != "teacher"]
    write_result(RESULTS / "distill_recipe.md",
                 f"Built-in job recipe probe: SmolLM2-135M-Instruct (held-out ppl {res['teacher']:.2f}) -> "
                 "`prune(params=0.5)`, forward KL, cosine to lr/10; perplexity on the whole built-in held-out split. "
                 "Equal steps per row, so the perplexities compare; the wall times were measured while other jobs ran "
                 "(load average beside them) and do not.\n\n"
                 + md_table(["recipe", "peak lr", "steps", "batch", "tokens", "ppl before", "ppl after", "x teacher",
                             "wall", "load"], rows, "lrrrrrrrrr")
                 + "\n\nCommand: `python benchmarks/distill_recipe.py "
                 + " ".join(f"{k}:{v['lr']:g}:{v['steps']}:{v['bs']}" for k, v in res.items() if k != "teacher")
                 + "` (1 thread)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
