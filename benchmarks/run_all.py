"""Run every minitron benchmark and write ONE markdown table: ``benchmarks/results/suite_<device>.md``.

Rows (each ratio is against the baseline row of its group, measured in the same run):

1. importance accumulation: ``accumulate_`` (activation sums, seq=mean) and
   ``block_importance_update_`` (layer cosine) per call, reference vs Triton, plus the
   hooked-forward overhead of :mod:`bench_importance`. On CPU only the reference path is
   timed (Triton runs only in its interpreter there, far too slow to time).
2. fused KD loss ``linear_kd_loss`` forward+backward: naive vs chunked (+ Triton and
   Liger's fused linear JSD on CUDA); time and extra peak memory, one fresh subprocess
   per point (``bench_fused_kl.worker``).
3. weight gathering: ``compact_`` in place vs ``index_select`` copies on a synthetic
   weight stack (``bench_gather._child``, one subprocess each; a CPU benchmark).
4. end-to-end prune of the built-in model: calibration + prune to 50% parameters,
   ``inplace=True`` vs a copy; time and extra peak memory (subprocess each).
5. distillation step throughput (tokens/s): built-in model as teacher, its 50% prune as
   student, ``loss_impl`` naive vs chunked (+ Triton on CUDA) (subprocess each).

6. calibration throughput (tokens/s): the importance-hooked pass vs a plain no-grad pass of
   the same batches through the decoder (no lm_head: calibration never needs logits),
   alternated batch by batch in one process.

``--model smollm2-135m`` runs rows 4-6 on the real SmolLM2-135M-Instruct (vocab 49152) instead of
the built-in 7.3M model and writes ``suite_<device>_smollm2-135m.md``.

Usage:
    python benchmarks/run_all.py                 # CPU, ~5 minutes on 2 cores
    python benchmarks/run_all.py --model smollm2-135m --only calib,prune,distill
    python benchmarks/run_all.py --device cuda   # GPU variant: larger shapes, Triton + Liger rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # common, suite_rows, suite_workers and the benchmarks it times

from common import RESULTS, cpu_name, write_result  # noqa: E402
from suite_rows import (  # noqa: E402
    MODEL,
    THREADS,
    Table,
    bench_calib,
    bench_distill,
    bench_fused_kl,
    bench_gather,
    bench_importance,
    bench_prune,
)

# shapes per device: CPU sizes keep the whole suite within ~6 minutes on 2 shared cores
SIZES = {
    "cpu": {"acc": (4, 256, 768), "hook": dict(hidden=256, layers=4, batch=4, seq=256, iters=3),
            "kl": [(1024, 32000, 1024), (1024, 128256, 512)], "kl_chunk": 256,
            "gather": dict(layers=6, hidden=1024, ffn=2816), "calib": (128, 256), "distill": (4, 256, 9)},
    "cuda": {"acc": (8, 4096, 4096), "hook": dict(hidden=2048, layers=8, batch=4, seq=2048, iters=10),
             "kl": [(4096, 128256, 4096), (16384, 128256, 4096)], "kl_chunk": 1024,
             "gather": dict(layers=6, hidden=1024, ffn=2816), "calib": (256, 256), "distill": (8, 512, 20)},
}


MODEL_SIZES = {  # per-model overrides of the CPU sizes (the 135M model is ~20x slower per token)
    "smollm2-135m": {"calib": (32, 256), "distill": (4, 256, 4), "calib_batches": (4, 8, 256)},
}


NOTES = {
    "cpu": "\nNotes:\n"
           "- The Triton kernels (importance accumulation, fused KD loss) only run in the Triton interpreter on CPU, "
           "which is far too slow to time: CPU rows are the reference/PyTorch paths. Run `--device cuda` for them.\n"
           "- Single timed runs on a shared machine: time ratios of the small end-to-end rows (prune, distill step) "
           "swung by up to 1.6x between two consecutive suite runs; the memory columns were stable.\n"
           "- One torch thread by default (`--threads`): on a shared, oversubscribed CPU two threads were up to 20x "
           "slower and wildly noisy.\n"
           "- CPU peaks are RSS: memory that glibc already holds from earlier work (calibration activations) is "
           "reused without raising the peak, so the prune-step peaks of the 29 MB built-in model are tiny for both "
           "variants; the weight-gathering rows (294 MB stack, fresh process) show the in-place saving.\n"
           "- The built-in model's vocabulary is 4096, so its logits are small and the chunked KD loss saves memory "
           "but not time there; the fused KD loss rows show the large-vocabulary case.\n",
    "cuda": "\nNotes:\n- bf16 inputs; the Liger row is LigerFusedLinearJSD with beta=0 (forward KL) when liger_kernel "
            "is installed.\n- Weight gathering runs on CPU (the in-place C++ extension vs PyTorch).\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="default: benchmarks/results/suite_<device>.md")
    ap.add_argument("--only", default="importance,fused_kl,gather,prune,distill,calib", help="comma-separated subset")
    ap.add_argument("--model", default="builtin-tiny", help="model of the prune/distill/calib rows "
                    "(builtin-tiny or smollm2-135m)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on cpu, which "
                    "gives stable times on a shared machine; 0 = torch default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    THREADS["n"] = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if THREADS["n"]:
        torch.set_num_threads(THREADS["n"])
    if args.worker:
        from suite_workers import WORKERS

        print("RESULT " + json.dumps(WORKERS[args.worker](**json.loads(args.spec))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    MODEL["name"] = args.model
    sz = {**SIZES[args.device], **(MODEL_SIZES.get(args.model, {}) if args.device == "cpu" else {})}
    table = Table()
    started = time.time()
    only = set(args.only.split(","))
    phases = [("importance", lambda: bench_importance(args.device, sz, table)),
              ("fused_kl", lambda: bench_fused_kl(args.device, sz, table)),
              ("gather", lambda: bench_gather(sz, table)),
              ("prune", lambda: bench_prune(args.device, sz, table)),
              ("distill", lambda: bench_distill(args.device, sz, table)),
              ("calib", lambda: bench_calib(args.device, sz, table))]
    seconds = {}
    for name, fn in phases:
        if name in only:
            t0 = time.time()
            fn()
            seconds[name] = time.time() - t0
    total = time.time() - started
    if args.device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        hw = f"{cpu_name()} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"# minitron benchmark suite ({args.device})\n\n"
            f"Command: `python benchmarks/run_all.py {' '.join(sys.argv[1:])}`  \n"
            f"Hardware: {hw}; torch {torch.__version__}, Python {platform.python_version()}; "
            f"load average at the end {load:.1f}; total {total:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}).\n\n"
            "Ratios are against the first row of each group (measured in the same run); lower is better for "
            "time and memory (for `distill step` the time ratio is naive tokens/s over this row's). Extra peak = "
            "peak memory above what existed before the measured work (CPU: ru_maxrss / VmHWM of a fresh "
            "subprocess; CUDA: max_memory_allocated).\n\n" + table.markdown() + "\n" + NOTES[args.device])
    suffix = "" if args.model == "builtin-tiny" else f"_{args.model}"
    out = write_result(Path(args.out) if args.out else RESULTS / f"suite_{args.device}{suffix}.md", text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
