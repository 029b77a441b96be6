"""Offline vs online teacher on SmolLM2-135M: held-out perplexity after the same training, cache size.

The teacher is SmolLM2-135M-Instruct; the student is ``prune(teacher, params=0.5)`` (the default
63.6M student), pruned once and copied for every run. Each run trains the same blocks in the same
order with the same schedule (forward KL, KD only): ``online`` with the teacher in memory, ``cached
k=K`` from a ``cache_teacher_logits`` cache of those blocks (top-K logits + the exact tail mass).
Reported: held-out perplexity (built-in text, valid split) before and after, disk bytes per token
(``8 K + 4``: int32 ids, fp32 logits, one fp32 log-sum-exp), the files' actual size, and (``--timed``,
on an otherwise idle machine: the load average is recorded) training tokens/s (the whole ``distill`` call,
checks and setup included) and the cache build time.

Usage (results in benchmarks/results/teacher_cache_real.md)::

    python benchmarks/teacher_cache_real.py [--steps 12] [--ks 16,64,256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, md_table, write_result  # noqa: E402

import minitron  # noqa: E402
from minitron.data import builtin_text, load_text_blocks  # noqa: E402
from minitron.distillation import DistillConfig  # noqa: E402
from minitron.models import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--calib-blocks", type=int, default=64, help="256-token blocks that prune the student "
                   "(64, as `minitron prune`, gives the default 63.6M student)")
    p.add_argument("--timed", action="store_true", help="report tokens/s and cache build time (idle machine only)")
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--ks", default="16,64,256")
    p.add_argument("--work", default="out/bench-teacher-cache")
    p.add_argument("--out", default=str(RESULTS / "teacher_cache_real.md"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher, tok = load_model(args.model)
    n_blocks = args.steps * args.batch_size  # every block seen once, in distill's own order
    train = load_text_blocks([builtin_text("train")], tok, args.seq_len)[:n_blocks]  # (n, S)
    valid = load_text_blocks([builtin_text("valid")], tok, args.seq_len)[: args.eval_blocks]
    student0 = minitron.prune(teacher, load_text_blocks([builtin_text("train")], tok, 256)[: args.calib_blocks],
                              params=0.5, verbose=False, progress=False)
    base = {"teacher_ppl": minitron.perplexity(teacher, valid, 8), "student_ppl": minitron.perplexity(student0, valid, 8),
            "params": minitron.count_parameters(student0)}
    print(json.dumps(base), flush=True)
    rows = []
    load = os.getloadavg()
    for k in ["online"] + [int(x) for x in args.ks.split(",") if x]:
        source = teacher
        size = build_s = None
        if k != "online":
            cache = work / f"cache-k{k}"
            if not (cache / "manifest.json").is_file():
                started = time.perf_counter()
                minitron.cache_teacher_logits(teacher, train, cache, top_k=k, tokenizer=tok, batch_size=4)
                build_s = time.perf_counter() - started
            size = sum(f.stat().st_size for f in cache.glob("shard-*.safetensors"))
            source = str(cache)
        cfg = DistillConfig(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=max(1, args.steps // 10),
                            seq_len=args.seq_len, batch_size=args.batch_size, save_every=None, eval_every=None,
                            plot=False, progress=False, resume=False, mixed_precision="fp32",
                            output_dir=str(work / f"run-{k}"))
        student = copy.deepcopy(student0)
        started = time.perf_counter()
        student = minitron.distill(student, source, train, None, config=cfg, tokenizer=tok)
        train_s = time.perf_counter() - started
        ppl = minitron.perplexity(student, valid, 8)
        n_tok = train.numel()
        rows.append(["online (teacher in memory)" if k == "online" else f"cached k={k}", f"{ppl:.2f}",
                     f"{ppl / base['teacher_ppl']:.2f}", "-" if size is None else f"{8 * k + 4}",
                     "-" if size is None else f"{size / n_tok:.1f}",
                     f"{n_tok / train_s:.0f}" if args.timed else "not measured",
                     ("-" if k == "online" else "reused" if build_s is None else f"{build_s:.1f} s ({n_tok / build_s:.0f} tok/s)")
                     if args.timed else "not measured"])
        print(rows[-1], flush=True)
        write_result(args.out, _report(args, base, rows, train, load))
    print(_report(args, base, rows, train, load))
    return 0


def _report(args, base: dict, rows: list, train: torch.Tensor, load: tuple) -> str:
    timing = (f"Timed on an otherwise idle machine ({torch.get_num_threads()} threads; load average "
              f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} when the runs started): tokens/s is the whole `distill` "
              "call (checks and setup included), the build time the whole `cache_teacher_logits` call. "
              if args.timed else "Timings (tokens/s, cache build time) are not measured: the machine is shared with "
              "other jobs. ")
    return "\n".join([
        "# Offline (cached top-k) vs online teacher",
        "",
        f"Written by `benchmarks/teacher_cache_real.py --steps {args.steps} --batch-size {args.batch_size} --seq-len "
        f"{args.seq_len} --calib-blocks {args.calib_blocks}{' --timed' if args.timed else ''}`. Teacher {args.model} (held-out ppl {base['teacher_ppl']:.2f}); student "
        f"`prune(teacher, params=0.5)` ({base['params'] / 1e6:.1f}M params, held-out ppl "
        f"{base['student_ppl']:.1f} before training). Every run: the same {train.shape[0]} blocks x "
        f"{train.shape[1]} tokens ({train.numel()} tokens, each block once), forward KL, KD only, lr {args.lr} "
        f"cosine, fp32, CPU. Held-out: the first {args.eval_blocks} blocks of the built-in valid split. "
        + timing +
        f"One seed and {args.steps} steps: no noise estimate, so differences of a few percent between rows are "
        "not resolved.",
        "",
        md_table(["teacher", "held-out ppl after", "x teacher", "bytes/token (8k+4)", "bytes/token on disk",
                  "tokens/s", "cache build time"], rows, "lrrrrll"),
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
