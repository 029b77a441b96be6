"""Benchmark: the cached-teacher top-k + tail KD loss, forward+backward on CPU, old (autograd) vs new (issue 27).

Shape: N = 2048 tokens (8 x 256), student H = 432, V = 49152, k = 64 cached ids per token (SmolLM2-135M's
half-size student distilled from a top-64 teacher cache). Variants, one process, in this order:

* ``reference fp32``: :func:`minitron.losses.cached.topk_tail_kd_loss_reference` (autograd, activation
  checkpointing: the logits GEMM runs twice; what the trainer ran before, with autocast off);
* ``fast fp32``: :func:`minitron.losses.cached.topk_tail_kd_loss`, fp32 inputs (gradient computed in forward,
  reused workspace);
* ``fast bf16 autocast``: the same under CPU bf16 autocast (fp32 logits GEMM, bf16 gradient GEMMs on CPUs with
  native bf16), what the trainer runs by default on such CPUs.

Per variant: seconds per forward+backward (median of the timed steps), minor page faults per step, and the
relative gradient error against the reference (Frobenius norm). Prints a markdown table with the load average;
``--out FILE`` also writes it. Run it on an idle machine: under load the figures mean little.

Usage:
    python benchmarks/cached_kd_loss_cpu.py --steps 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, md_table, write_result  # noqa: E402

N, H, V, K = 2048, 432, 49152, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    import torch

    from minitron.losses.cached import topk_tail_kd_loss, topk_tail_kd_loss_reference

    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    t = torch.randn(N, V, generator=g) * 3.0  # teacher logits, only to build the cache rows
    top = t.topk(K, -1)
    ids, z, lse = top.indices, top.values, t.logsumexp(-1)
    del t, top

    def step(fn, amp: bool) -> tuple[float, int]:
        h.grad = w.grad = None
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = fn(h, w, ids, z, lse)
        loss.backward()
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    load0 = os.getloadavg()
    rows, ref = [], None
    for name, fn, amp in (("reference fp32", topk_tail_kd_loss_reference, False),
                          ("fast fp32", topk_tail_kd_loss, False), ("fast bf16 autocast", topk_tail_kd_loss, True)):
        step(fn, amp)  # warm-up: workspace, oneDNN primitives
        runs = [step(fn, amp) for _ in range(args.steps)]
        sec = statistics.median(r[0] for r in runs)
        faults = statistics.median(r[1] for r in runs)
        grads = (h.grad.clone(), w.grad.clone())
        ref = ref or grads
        err = max(float((a - b).norm() / b.norm()) for a, b in zip(grads, ref))
        rows.append((name, f"{sec:.3f}", f"{N / sec:.0f}", f"{faults:.0f}", f"{err:.1e}"))
        print(rows[-1], flush=True)
    load1 = os.getloadavg()
    text = (f"N={N}, H={H}, V={V}, k={K}, {torch.get_num_threads()} threads, {cpu_name()}; load average "
            f"{load0[0]:.2f} before, {load1[0]:.2f} after\n\n"
            + md_table(("variant", "s / fwd+bwd", "tok/s (loss only)", "minor faults / step", "grad rel err"), rows)
            + "\n")
    print(text)
    if args.out:
        write_result(args.out, text)


if __name__ == "__main__":
    main()
