"""Benchmark: peak memory and time of linear_kd_loss paths (forward + backward).

Each (impl, N, V, H) point runs in a fresh subprocess so peak memory is clean:
  CPU:  extra peak RSS = ru_maxrss - RSS after the inputs exist (so weights/inputs excluded)
  CUDA: torch.cuda.max_memory_allocated - memory allocated after the inputs exist
Ratios are against ``naive`` measured in the same run. Inputs: fp32 on CPU, bf16 on CUDA;
student and teacher share H and V (teacher weight frozen). Liger's LigerFusedLinearJSD
(beta=0, i.e. forward KL) is added on CUDA when liger_kernel is installed. ``gemm`` times the
GEMMs alone: the same four chunked GEMMs the fused loss runs (student and teacher logits,
dX and dW) with the same dtypes, and nothing else; the issue's GPU target is the fused loss
within 1.3x of it.

Usage:
    python benchmarks/bench_fused_kl.py --device cpu --n 256 1024 --v 32000 128256 --h 2048 \
        --out benchmarks/results/fused_kl_cpu.md
    python benchmarks/bench_fused_kl.py --device cuda --n 1024 4096 16384 --v 32000 128256 256000 --h 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import max_rss_mb, rss_mb


def gemm_only_step(hs, ws, ht, wt, chunk: int) -> None:
    """The GEMMs of one fused fwd+bwd step, and nothing else (the lower bound of any chunked path)."""
    import torch

    from minitron.losses.kd.gemm import Gemm
    from minitron.losses.kd.workspace import workspace_for

    space = workspace_for(hs)
    gs, gt = Gemm(ws, hs.dtype, space, "s", grads=True), Gemm(wt, ht.dtype, space, "t")
    n, v = hs.shape[0], ws.shape[0]
    grad_h = torch.empty(hs.shape, dtype=torch.float32, device=hs.device)  # (N, Hs)
    grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=hs.device)  # (V, Hs)
    g = torch.full((min(chunk, n), v), 1e-3, dtype=gs.grad_dtype, device=hs.device)  # stands for dL/dlogits
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        h = hs[i:j].detach()
        gs.logits(h, None, chunk)  # (c, V) fp32
        gt.logits(ht[i:j], None, chunk)
        grad_h[i:j] = gs.grad_act(g[: j - i])
        gs.acc_grad_weight_(grad_w, g[: j - i], h)


def worker(impl: str, n: int, v: int, h: int, device: str, warmup: int, reps: int, chunk: int) -> dict:
    import torch

    from minitron.losses import last_impl, linear_kd_loss

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hs = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    ws = (torch.randn(v, h, device=device, dtype=dtype) * 0.02).requires_grad_()
    ht = torch.randn(n, h, device=device, dtype=dtype)
    wt = torch.randn(v, h, device=device, dtype=dtype) * 0.02
    labels = torch.zeros(n, dtype=torch.long, device=device)
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD

        liger = LigerFusedLinearJSD(jsd_beta=0.0)
        step = lambda: liger(hs, ws, ht, wt, labels)  # noqa: E731
    elif impl == "gemm":
        step = None
    else:
        step = lambda: linear_kd_loss(hs, ws, ht, wt, impl=impl, chunk_size=chunk)  # noqa: E731

    def run() -> None:
        hs.grad = ws.grad = None
        if step is None:
            gemm_only_step(hs, ws, ht, wt.detach(), chunk)
        else:
            step().backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mb()
    for _ in range(warmup):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = max_rss_mb() - base
    ms = (time.perf_counter() - t0) / max(reps, 1) * 1e3
    return {"ms": ms, "peak_mb": peak, "path": impl if impl in ("liger", "gemm") else last_impl()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--v", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--h", type=int, nargs="+", default=[2048])
    ap.add_argument("--impls", nargs="+", default=None,
                    help="default: naive chunked gemm (+ triton, liger on cuda); gemm = the GEMMs alone")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=None, help="default 0 on cpu, 2 on cuda")
    ap.add_argument("--reps", type=int, default=None, help="default 1 on cpu, 5 on cuda")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else (2 if args.device == "cuda" else 0)
    reps = args.reps if args.reps is not None else (5 if args.device == "cuda" else 1)
    if args.worker:
        res = worker(args.impls[0], args.n[0], args.v[0], args.h[0], args.device, warmup, reps, args.chunk)
        print("RESULT " + json.dumps(res))
        return
    impls = args.impls or ["naive", "chunked", "gemm"]
    if args.impls is None and args.device == "cuda":
        impls.append("triton")
        try:
            import liger_kernel  # noqa: F401

            impls.append("liger")
        except ImportError:
            pass
    rows = []
    for h in args.h:
        for v in args.v:
            for n in args.n:
                results = {}  # impl -> result dict, or the error line of a failed worker
                for impl in impls:
                    cmd = [sys.executable, __file__, "--worker", "--device", args.device, "--impls", impl,
                           "--n", str(n), "--v", str(v), "--h", str(h), "--chunk", str(args.chunk),
                           "--warmup", str(warmup), "--reps", str(reps)]
                    r = subprocess.run(cmd, capture_output=True, text=True)
                    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                    if r.returncode != 0 or not line:
                        results[impl] = (r.stderr.strip().splitlines() or ["?"])[-1][:80]
                    else:
                        results[impl] = json.loads(line[0][7:])
                    print(f"{impl} N={n} V={v} H={h}: {results[impl]}", flush=True)
                # ratios against naive and against the GEMMs alone, both measured in this run
                base, gemm = (results.get(k) if isinstance(results.get(k), dict) else None for k in ("naive", "gemm"))
                for impl, res in results.items():
                    if not isinstance(res, dict):
                        rows.append(f"| {impl} | {n} | {v} | {h} | failed: {res} | | | | |")
                        continue
                    ratio_t = f"{res['ms'] / base['ms']:.2f}" if base else "-"
                    ratio_m = f"{res['peak_mb'] / base['peak_mb']:.3f}" if base and base["peak_mb"] > 0 else "-"
                    ratio_g = f"{res['ms'] / gemm['ms']:.2f}" if gemm else "-"
                    rows.append(f"| {res['path']} | {n} | {v} | {h} | {res['ms']:.0f} | {ratio_t} | "
                                f"{res['peak_mb']:.0f} | {ratio_m} | {ratio_g} |")
    head = ("| impl | N | V | H | fwd+bwd ms | time / naive | extra peak MiB | peak / naive | time / GEMMs |\n"
            "|---|---|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows)
    print("\n" + table)
    if args.out:
        note = (f"# linear_kd_loss benchmark ({args.device})\n\n"
                f"Command: `python benchmarks/bench_fused_kl.py {' '.join(sys.argv[1:])}`\n"
                f"Inputs {'bf16' if args.device == 'cuda' else 'fp32'}, forward KL, tau=1, chunk={args.chunk}, "
                f"warmup={warmup}, reps={reps}. Extra peak = peak memory above the inputs/weights "
                f"({'max_memory_allocated' if args.device == 'cuda' else 'ru_maxrss of a fresh process'}); "
                "includes the fp32 gradients (N x H, V x H) every path must produce.\n\n")
        with open(args.out, "w") as f:
            f.write(note + table + "\n")


if __name__ == "__main__":
    main()
