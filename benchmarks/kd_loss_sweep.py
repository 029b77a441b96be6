"""Benchmark: the drop-in loss ``LinearKDLoss`` vs Liger's ``LigerFusedLinearJSDLoss``: gradient error and peak memory.

Part 1, error. For a sweep of (N, Hs, Ht, V) (odd sizes, chunk tails, ignored labels), bf16 inputs are
fed to ``minitron.losses.LinearKDLoss`` and to Liger's ``LigerFusedLinearJSDLoss`` (pure PyTorch;
``compiled=False``, so it runs on the CPU), same options (Liger's defaults: weight_hard_loss 0.5,
weight_soft_loss 0.5, plus beta in {0 (forward KL), 0.5}). The reference is a naive full-logits fp32
computation (written out below) on the same bf16 values upcast to fp32, so only the arithmetic of each
path is measured. Reported per gradient (student input, student weight, student bias) and for the loss:
``rel_l2 = ||g - ref||_2 / ||ref||_2`` and ``rel_max = max|g - ref| / max|ref|``. The fp32 rows run
both losses on the fp32 values (the floor: summation order only).

Part 2, memory. Extra peak RSS (``VmHWM``, reset once the inputs exist, minus the RSS then) of one forward+backward,
each point in a fresh subprocess: naive full logits (autograd), ``LinearKDLoss`` (chunked path),
Liger (``compiled=False``). Timings are NOT measured (shared, loaded machine).

Usage:
    python benchmarks/kd_loss_sweep.py                    # -> benchmarks/results/kd_loss_sweep.md
    python benchmarks/kd_loss_sweep.py --quick            # small shapes only (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_name, max_rss_mb, md_table, reset_hwm, rss_mb, status_kb, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(255, 64, 96, 1001), (512, 128, 128, 4099), (1023, 96, 160, 8191), (2048, 256, 384, 32000)]
QUICK_SHAPES = [(63, 16, 24, 257), (130, 32, 32, 1001)]
MEM_SHAPES = [(4096, 256, 256, 32000)]
LOGIT_STD = 4.0  # weights scaled so student/teacher logits have about this std (LM-like ranges)


def naive_reference(hs, ws, bs, ht, wt, labels, beta: float, temperature: float, w_hard: float, w_soft: float):
    """Liger's loss with full (N, V) fp32 logits and plain autograd (no chunks, no fusion)."""
    import torch
    import torch.nn.functional as F

    s = hs.float() @ ws.float().t() + bs.float()  # (N, V) fp32
    with torch.no_grad():
        t = ht.float() @ wt.float().t()  # (N, V) fp32
    keep = labels != -100
    denom = keep.sum().clamp_min(1)
    hard = F.cross_entropy(s, labels, ignore_index=-100, reduction="sum") / denom
    log_q = (s[keep] / temperature).log_softmax(-1)
    log_p = (t[keep] / temperature).log_softmax(-1)
    q, p = log_q.exp(), log_p.exp()
    if beta == 0.0:
        per_tok = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = (beta * p + (1 - beta) * q).log()
        per_tok = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    return w_hard * hard + w_soft * per_tok.sum() / denom


def _inputs(n: int, h_s: int, h_t: int, v: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, h_s, generator=g)
    ht = torch.randn(n, h_t, generator=g)
    ws = torch.randn(v, h_s, generator=g) * (LOGIT_STD / h_s**0.5)
    wt = torch.randn(v, h_t, generator=g) * (LOGIT_STD / h_t**0.5)
    bs = torch.randn(v, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    labels[-3:] = -100
    return hs, ws, bs, ht, wt, labels


def _grads(fn, hs, ws, bs, ht, wt, labels):
    leaves = [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]
    loss = fn(leaves[0], leaves[1], ht, wt, labels, leaves[2])
    loss.backward()
    return loss.detach().double(), [x.grad.double() for x in leaves]


def _err(a, b) -> tuple[float, float]:
    d = a - b
    return float(d.norm() / b.norm().clamp_min(1e-30)), float(d.abs().max() / b.abs().max().clamp_min(1e-30))


def error_rows(shapes, betas=(0.0, 0.5), temperature: float = 1.0) -> list[list[object]]:
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    from minitron.losses import LinearKDLoss

    rows = []
    for n, h_s, h_t, v in shapes:
        base = _inputs(n, h_s, h_t, v)
        hs, ws, bs, ht, wt, labels = base
        for beta in betas:
            opts = dict(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=beta, temperature=temperature)
            ours = LinearKDLoss(**opts, chunk_size=1024, impl="chunked")
            liger = LigerFusedLinearJSDLoss(**opts, compiled=False, chunk_size=1024)

            def ref_fn(a, b, c, d, y, e):
                return naive_reference(a, b, e, c, d, y, beta, temperature, 0.5, 0.5)

            for dtype in (torch.bfloat16, torch.float32):
                x = [t.to(dtype) if t.is_floating_point() else t for t in base]  # the inputs both paths get
                ref_loss, ref_g = _grads(ref_fn, *[t.float() if t.is_floating_point() else t for t in x])
                for name, fn in (("minitron LinearKDLoss", ours), ("Liger LigerFusedLinearJSDLoss", liger)):
                    loss, g = _grads(fn, *x)
                    errs = [_err(a, b) for a, b in zip(g, ref_g)]
                    rows.append([f"{n}x{h_s}x{h_t}x{v}", beta, str(dtype).replace("torch.", ""), name,
                                 f"{abs(float(loss - ref_loss)) / abs(float(ref_loss)):.1e}",
                                 *(f"{e[0]:.1e} / {e[1]:.1e}" for e in errs)])
    return rows


def mem_worker(impl: str, n: int, h: int, v: int, dtype_name: str) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    warm = [t.to(dtype) if t.is_floating_point() else t for t in _inputs(16, h, h, 64)]
    hs, ws, bs, ht, wt, labels = warm
    hs, ws, bs = (x.requires_grad_() for x in (hs, ws, bs))
    step = _mem_step(impl, hs, ws, bs, ht, wt, labels)
    step().backward()  # warm-up on a tiny problem: lazy imports, thread pools, autograd engine start-up
    hs, ws, bs, ht, wt, labels = (t.to(dtype) if t.is_floating_point() else t for t in _inputs(n, h, h, v))
    hs, ws, bs = (x.requires_grad_() for x in (hs, ws, bs))
    fn = _mem_step(impl, hs, ws, bs, ht, wt, labels)
    hwm = reset_hwm()  # the peak counter restarts here: input construction (fp32 then bf16 copies) is not counted
    base = rss_mb()
    fn().backward()
    peak = status_kb("VmHWM") / 1024 if hwm else max_rss_mb()
    return {"peak_mb": peak - base}


def _mem_step(impl: str, hs, ws, bs, ht, wt, labels):
    """The forward of one measured loss, as a closure."""
    if impl == "naive":
        fn = lambda: naive_reference(hs, ws, bs, ht, wt, labels, 0.0, 1.0, 0.5, 0.5)  # noqa: E731
    elif impl == "minitron":
        from minitron.losses import LinearKDLoss

        loss_fn = LinearKDLoss(beta=0.0, chunk_size=1024, impl="chunked")
        fn = lambda: loss_fn(hs, ws, ht, wt, labels, bs)  # noqa: E731
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(beta=0.0, compiled=False, chunk_size=1024)
        fn = lambda: loss_fn(hs, ws, ht, wt, labels, bs)  # noqa: E731
    return fn


def memory_rows(shapes) -> list[list[object]]:
    rows = []
    for n, h, _, v in shapes:
        for dtype in ("float32", "bfloat16"):
            logits_mb = n * v * 4 / 2**20
            for impl in ("naive", "minitron", "liger"):
                cmd = [sys.executable, __file__, "--worker", impl, str(n), str(h), str(v), dtype]
                r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                peak = f"{json.loads(line[-1][7:])['peak_mb']:.0f}" if line else "failed: " + r.stderr.strip()[-120:]
                rows.append([f"{n}x{h}x{v}", dtype, impl, peak, f"{logits_mb:.0f}", "not measured"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--out", default=str(RESULTS / "kd_loss_sweep.md"))
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, n, h, v, dtype = args.worker
        print("RESULT " + json.dumps(mem_worker(impl, int(n), int(h), int(v), dtype)))
        return
    import torch

    torch.manual_seed(0)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    err = error_rows(shapes)
    mem = memory_rows(QUICK_SHAPES[-1:] if args.quick else MEM_SHAPES)
    text = "\n".join([
        "# Drop-in KD loss: gradient error and peak memory vs Liger",
        "",
        f"Written by `benchmarks/kd_loss_sweep.py{' --quick' if args.quick else ''}` on {cpu_name()}, "
        f"torch {torch.__version__}, CPU (Liger's `LigerFusedLinearJSDLoss` is pure PyTorch: run with "
        "`compiled=False`). Timings: not measured (shared, loaded machine).",
        "",
        "## Error of bf16 inputs vs the naive fp32 reference",
        "",
        "Random inputs, student/teacher logits of std about "
        f"{LOGIT_STD:g}, 1/5 of the labels ignored; weight_hard_loss = weight_soft_loss = 0.5, temperature 1. "
        "The reference computes full (N, V) fp32 logits on the same (bf16-rounded) values. Columns: relative "
        "error of the loss, and `rel_l2 / rel_max` of each gradient (`||g - ref|| / ||ref||`, "
        "`max|g - ref| / max|ref|`). The fp32 rows are the floor (summation order). A bf16 gradient cannot be "
        "closer than its own final rounding: about 1.6e-3 rel_l2 (bf16 keeps 8 significant bits: up to "
        "2^-8 = 3.9e-3 of each entry); the hard- and soft-term gradients are also added in bf16 by autograd.",
        "",
        md_table(["N x Hs x Ht x V", "beta", "inputs", "loss", "loss rel err", "d student_input",
                  "d student_weight", "d student_bias"], err, "llllrrrr"),
        "",
        "## Extra peak memory of one forward + backward (MiB)",
        "",
        "Fresh subprocess per row, after a warm-up call on a tiny problem; peak RSS (`VmHWM`, reset once the inputs exist) minus the RSS then (so inputs and weights are "
        "excluded); H = Hs = Ht; beta = 0, chunk 1024. `(N, V) fp32 logits` is the size of one full logits "
        "tensor, for scale.",
        "",
        md_table(["N x H x V", "inputs", "loss", "extra peak MiB", "(N, V) fp32 logits MiB", "time"], mem,
                 "lllrrl"),
        "",
    ])
    print(text)
    write_result(args.out, text)


if __name__ == "__main__":
    main()
