"""Benchmark: one KD loss forward+backward on CPU at the distillation shape of issue 27, vs its GEMM floor.

Shape: N = 2048 tokens (8 x 256), student H = 432, teacher H = 576, V = 49152 (SmolLM2-135M teacher,
its default half-size student). Variants, each in a fresh subprocess (clean peak RSS and page faults):

* ``naive``: full (N, V) fp32 logits and plain autograd (``impl="naive"``), fp32 inputs;
* ``old fp32 chunked``: ``impl="chunked"``, fp32, chunk 1024, every chunk buffer freshly allocated
  (the loop before the workspace: emulated by a workspace that never reuses a buffer);
* ``new fp32, reference pass``: ``impl="chunked"``, fp32 inputs, default chunk size, reused workspace,
  the chunk's softmax/KL pass by the pure-PyTorch reference (``MINITRON_KD_CPU_KERNEL=0``);
* ``new fp32``: the same with the fused C++ softmax/KL pass (``csrc/kd_cpu.cpp``, AVX-512);
* ``new bf16``: the same with bf16 hidden states and lm_head weights (what CPU autocast hands the loss):
  fp32 logits GEMMs, bf16 gradient GEMMs (:mod:`minitron.losses.kd.gemm`).

Per variant: seconds per forward+backward (median of the timed repeats), the GEMM floor (the loss's four
GEMMs at the rate ``torch.mm`` reaches for each shape and dtype, measured in the same run with reused
outputs) and the ratio, peak RSS, minor page faults per step (``getrusage`` ``ru_minflt``) and the load
average. The floor of the bf16 row is the all-bf16 one (every GEMM at the bf16 rate); a second column gives
the floor at the dtypes the path runs (fp32 logits GEMMs, bf16 gradient GEMMs).

Usage:
    python benchmarks/kd_loss_cpu.py --quick      # 1 warm-up + 2 timed steps per variant (..._quick.md)
    python benchmarks/kd_loss_cpu.py --errors-only  # the bf16-vs-fp32 gradient error table only
    python benchmarks/kd_loss_cpu.py              # 2 + 5, writes benchmarks/results/kd_loss_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, md_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, HS, HT, V = 2048, 432, 576, 49152
VARIANTS = ("naive", "old fp32 chunked", "new fp32, reference pass", "new fp32", "new bf16")


def _inputs(dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, HS, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(V, HS, generator=g) * 0.2).to(dtype).requires_grad_()  # logit std ~4
    ht = torch.randn(N, HT, generator=g).to(dtype)
    wt = (torch.randn(V, HT, generator=g) * 0.17).to(dtype)
    return hs, ws, ht, wt


def _gemm_rate(m: int, k: int, n: int, dtype, reps: int) -> float:
    """FLOP/s of ``(m, k) @ (k, n)`` with a reused output, best of ``reps``."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def floor_s(dtypes, reps: int, chunk: int) -> float:
    """Seconds of the loss's four GEMMs at measured rates: logits (s, t), d hidden, d weight.

    ``dtypes``: the dtype of each of the four GEMMs, in that order.
    """
    c = min(chunk, N)
    shapes = [(c, HS, V), (c, HT, V), (c, V, HS), (V, c, HS)]  # (m, k, n) per chunk
    return sum((N / c) * 2 * m * k * n / _gemm_rate(m, k, n, dt, reps) for (m, k, n), dt in zip(shapes, dtypes))


def errors(close: bool) -> dict:
    """Relative L2 error of dH, dW (and the loss) of the bf16 path vs the fp32 path on the same bf16 values.

    ``close``: the teacher's logits are the student's plus 2% noise (late in distillation, where the
    logits gradient Q - P is small and rounding matters most); else an unrelated teacher.
    """
    import torch

    from minitron.losses import linear_kd_loss

    g = torch.Generator().manual_seed(1)
    hs = torch.randn(N, HS, generator=g)
    ws = torch.randn(V, HS, generator=g) * 0.2  # logit std ~4
    if close:
        ht = torch.cat([hs, torch.randn(N, HT - HS, generator=g)], 1)
        wt = torch.cat([ws + 0.004 * torch.randn(V, HS, generator=g), 0.01 * torch.randn(V, HT - HS, generator=g)], 1)
    else:
        ht, wt = torch.randn(N, HT, generator=g), torch.randn(V, HT, generator=g) * 0.17
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        h = hs.bfloat16().to(dt).requires_grad_()
        w = ws.bfloat16().to(dt).requires_grad_()
        loss = linear_kd_loss(h, w, ht.bfloat16().to(dt), wt.bfloat16().to(dt), impl="chunked")
        loss.backward()
        out[name] = (loss.item(), h.grad.float(), w.grad.float())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    (l32, h32, w32), (l16, h16, w16) = out["fp32"], out["bf16"]
    return dict(teacher="close (logits + 2% noise)" if close else "unrelated", loss_rel=abs(l16 - l32) / abs(l32),
                dh=rel(h16, h32), dw=rel(w16, w32))


def worker(variant: str, reps: int, warm: int) -> dict:
    import torch

    from minitron.losses import linear_kd_loss
    from minitron.losses.kd import chunked, gemm

    dtype = torch.bfloat16 if variant == "new bf16" else torch.float32
    if variant in ("old fp32 chunked", "new fp32, reference pass"):
        os.environ["MINITRON_KD_CPU_KERNEL"] = "0"  # read at each call: the pure-PyTorch softmax/KL pass
    kw = dict(impl="naive") if variant == "naive" else dict(impl="chunked")
    if variant == "old fp32 chunked":
        class Fresh(gemm.Workspace):  # the loop before reuse: a new buffer for every request
            def get(self, name, shape, dtype, device):
                return torch.empty(shape, dtype=dtype, device=device)

        chunked.workspace_for = lambda t: Fresh()
        kw["chunk_size"] = 1024
    hs, ws, ht, wt = _inputs(dtype)

    def step():
        hs.grad = ws.grad = None
        linear_kd_loss(hs, ws, ht, wt, **kw).backward()

    for _ in range(warm):
        step()
    times, faults = [], []
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    times.sort()
    from minitron.losses.kd.chunked import default_chunk_size

    chunk = {"naive": N, "old fp32 chunked": 1024}.get(variant) or default_chunk_size(V, "cpu")
    from minitron.losses.kd.cpu_kernel import cpu_kernel
    r = max(reps, 3)
    fl = floor_s((dtype,) * 4, r, chunk)  # every GEMM at the rate of the input dtype (all-bf16 for bf16)
    own = floor_s((torch.float32, torch.float32, dtype, dtype), r, chunk)  # the dtypes this path runs
    return dict(variant=variant, s=times[len(times) // 2], floor_s=fl, own_floor_s=own, chunk=chunk,
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                faults=sorted(faults)[len(faults) // 2], threads=torch.get_num_threads(),
                cpu_kernel=variant != "naive" and cpu_kernel() is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps (results/kd_loss_cpu_quick.md)")
    ap.add_argument("--errors-only", action="store_true", help="only the bf16-vs-fp32 gradient error table")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    reps, warm = (2, 1) if args.quick else (5, 2)
    reps = args.reps or reps
    if args.worker == "errors":
        print(json.dumps([errors(True), errors(False)]))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, reps, warm)))
        return
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'kernels'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, __file__, "--worker", "errors"], env=env, capture_output=True, text=True,
                         check=True).stdout
    err_table = md_table(["teacher", "loss rel. error", "dH rel. L2 error", "dW rel. L2 error"],
                         [[e["teacher"], f"{e['loss_rel']:.1e}", f"{e['dh']:.1e}", f"{e['dw']:.1e}"]
                          for e in json.loads(out.strip().splitlines()[-1])])
    print(err_table, flush=True)
    if args.errors_only:
        return
    rows = []
    for v in VARIANTS:
        load0 = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--worker", v, "--reps", str(reps)], env=env,
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["load"] = max(load0, os.getloadavg()[0])
        rows.append(r)
        print(f"{v:18s} {r['s']:.2f} s  floor {r['floor_s']:.2f} s  x{r['s'] / r['floor_s']:.2f}  "
              f"own-dtype floor {r['own_floor_s']:.2f} s  "
              f"peak {r['peak_mb']:.0f} MB  {r['faults']} minflt/step  load {r['load']:.1f}", flush=True)
    table = md_table(["variant", "softmax/KL pass", "chunk", "s / fwd+bwd", "GEMM floor s", "x floor", "floor at its own GEMM dtypes s",
                      "peak RSS MB", "minor faults / step", "load avg"],
                     [[r["variant"], "C++ (AVX-512)" if r.get("cpu_kernel") else "PyTorch", r["chunk"], f"{r['s']:.2f}", f"{r['floor_s']:.2f}", f"{r['s'] / r['floor_s']:.2f}",
                       f"{r['own_floor_s']:.2f}",
                       f"{r['peak_mb']:.0f}", r["faults"], f"{r['load']:.1f}"] for r in rows])
    print(table)
    RESULTS.mkdir(exist_ok=True)
    name = "kd_loss_cpu_quick.md" if args.quick else "kd_loss_cpu.md"
    (RESULTS / name).write_text(
        f"# KD loss on CPU at N={N}, Hs={HS}, Ht={HT}, V={V} ({rows[0]['threads']} threads)\n\n{table}\n\n"
        f"Gradient error of the bf16 path (fp32 logits GEMMs, bf16 gradient GEMMs) vs the fp32 path on the same\n"
        f"bf16 values (one fwd+bwd, default chunk):\n\n{err_table}\n\n"
        f"Command: `python benchmarks/kd_loss_cpu.py{' --quick' if args.quick else ''}`\n")


if __name__ == "__main__":
    main()
