"""Where one distillation step's time goes, and how far each part is from its floor.

One step (teacher forward, student forward, KD loss forward + backward, student backward, optimizer)
is run part by part, the way ``DistillModule`` + ``Trainer.train_step`` run it, with a timer around
each part. A second, instrumented run (a ``TorchDispatchMode``) times every GEMM and attention kernel
and records its shape, so that

- loss GEMMs = the GEMM kernels inside the loss; loss elementwise = the loss part minus them;
- attention = the attention kernels of teacher and student, forward and backward (they are inside the
  teacher/student rows too: attention is a sub-part, not added to the sum);
- each part's floor: its GEMM FLOPs divided by the rate that this run measures for the same dtype, shape
  and transposition (attention: FLOPs at the rate of the equivalent batched GEMM), and for the memory-
  bound parts bytes / the copy bandwidth measured here (loss elementwise: read student and teacher
  logits once, write the gradient once, 3 x N x V x 4 bytes; optimizer: AdamW reads p, g, m, v and
  writes p, m, v, 28 bytes per parameter).

tokens/s of whole steps comes from real ``minitron.distill`` runs (the Trainer's own ``tokens_per_s``,
median over the steps after the first) for fp32, bf16, the naive loss (fp32) and the offline teacher
cache (``minitron.cache_teacher_logits``, top-64), side by side in one run. The load average and thread
count are recorded: figures measured on a loaded machine mean nothing.

Usage (results in benchmarks/results/distill_step_profile.{md,json})::

    python benchmarks/distill_step_profile.py --quick      # builtin-tiny teacher, 4 x 64 tokens, seconds
    python benchmarks/distill_step_profile.py              # SmolLM2-135M -> its params=0.5 student, 8 x 256
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, md_table, write_result  # noqa: E402

import minitron  # noqa: E402
from minitron.adapters import base_decoder, lm_head_params  # noqa: E402
from minitron.data import builtin_text, load_text_blocks  # noqa: E402
from minitron.distillation import DistillConfig  # noqa: E402
from minitron.distillation.precision import frozen_in_bf16  # noqa: E402
from minitron.distillation.runtime import fast_bf16_cpu, load_average, physical_cores  # noqa: E402
from minitron.losses import linear_kd_loss  # noqa: E402
from minitron.losses.linear_kd import shared_vocab_head  # noqa: E402
from minitron.models import load_model  # noqa: E402

aten = torch.ops.aten
GEMMS = {aten.mm, aten.addmm, aten.bmm}
ATTN_FWD, ATTN_BWD = aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention_for_cpu_backward
PARTS = ("teacher forward", "student forward", "loss", "student backward", "optimizer")


def _gemm_key(func, args) -> tuple:
    """(kind, dtype, shapes, transposed flags) of a GEMM: what its rate depends on."""
    a, b = (args[1], args[2]) if func._overloadpacket is aten.addmm else (args[0], args[1])
    trans = tuple(bool(t.stride(-2) == 1 and t.shape[-2] > 1 and t.stride(-1) != 1) for t in (a, b))
    return ("bmm" if a.ndim == 3 else "mm", str(a.dtype).split(".")[-1], tuple(a.shape), tuple(b.shape), trans)


def _gemm_flops(key: tuple) -> float:
    _, _, sa, sb, _ = key  # (.., M, K) x (.., K, N): 2 M K N per batch
    return 2.0 * sa[-2] * sa[-1] * sb[-1] * (sa[0] if len(sa) == 3 else 1)


def _attn(func, args, kwargs) -> tuple[tuple, float]:
    """(equivalent batched-GEMM key, FLOPs) of a CPU flash-attention call: QK^T and PV, 2.5x that backward,
    halved when causal (the kernel skips the masked blocks)."""
    bwd = func._overloadpacket is ATTN_BWD
    q, k = (args[1], args[2]) if bwd else (args[0], args[1])
    causal = (args[7] if len(args) > 7 else kwargs.get("is_causal")) if bwd else (args[4] if len(args) > 4 else kwargs.get("is_causal", False))
    b, h, s, d = q.shape
    flops = 4.0 * b * h * s * k.shape[2] * d * (0.5 if causal else 1.0) * (2.5 if bwd else 1.0)
    return ("bmm", str(q.dtype).split(".")[-1], (b * h, s, d), (b * h, d, k.shape[2]), (False, False)), flops


class KernelTimer(TorchDispatchMode):
    """Times every GEMM / attention kernel (CPU: synchronous) under the current ``part`` label."""

    def __init__(self) -> None:
        super().__init__()
        self.part = "?"
        self.rows: list[tuple[str, str, tuple, float, float]] = []  # (part, kind, rate key, flops, seconds)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        if func._overloadpacket in GEMMS:  # bmm: eager attention's QK^T / PV (and rotary's tiny outer product)
            key = _gemm_key(func, args)
            self.rows.append((self.part, "attention" if key[0] == "bmm" else "gemm", key, _gemm_flops(key), dt))
        elif func._overloadpacket in (ATTN_FWD, ATTN_BWD):
            key, flops = _attn(func, args, kwargs)
            self.rows.append((self.part, "attention", key, flops, dt))
        return out


def gemm_rate(key: tuple, min_s: float, cache: dict) -> float:
    """FLOP/s of one GEMM of this dtype, shape and transposition, measured here (cached per key)."""
    if key not in cache:
        kind, dtype, sa, sb, (ta, tb) = key
        dt = getattr(torch, dtype)

        def make(shape, t):
            x = torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dt) if t else torch.randn(*shape, dtype=dt)
            return x.transpose(-1, -2) if t else x

        a, b = make(sa, ta), make(sb, tb)
        op = torch.bmm if kind == "bmm" else torch.mm
        op(a, b)
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < min_s:
            op(a, b)
            n += 1
        cache[key] = _gemm_flops(key) * n / (time.perf_counter() - t0)
    return cache[key]


def copy_bandwidth(min_s: float) -> float:
    """Bytes/s of a 256 MiB fp32 copy (read + write): the floor's memory rate."""
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_s:
        dst.copy_(src)
        n += 1
    return 2 * src.numel() * 4 * n / (time.perf_counter() - t0)


def one_step(student, teacher, opt, params, x, bf16: bool, impl: str, timer: KernelTimer | None = None) -> dict:
    """One KD step in parts (as DistillModule + Trainer.train_step): seconds per part."""
    times = {}
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def mark(name, t0):
        times[name] = time.perf_counter() - t0
        if timer is not None:
            timer.part = PARTS[min(PARTS.index(name) + 1, len(PARTS) - 1)]
        return time.perf_counter()

    if timer is not None:
        timer.part = PARTS[0]
    B, T = x.shape
    with amp:
        t = time.perf_counter()
        with torch.no_grad():
            h_t = base_decoder(teacher)(input_ids=x, use_cache=False).last_hidden_state  # (B, T, Ht)
        t = mark("teacher forward", t)
        h_s = base_decoder(student)(input_ids=x, use_cache=False).last_hidden_state  # (B, T, Hs)
        t = mark("student forward", t)
        hs = h_s.detach().reshape(B * T, -1).requires_grad_()  # the loss's input: its backward stops here
        ws, bs = lm_head_params(student)
        wt, bt = shared_vocab_head(*lm_head_params(teacher), ws.shape[0])
        loss = linear_kd_loss(hs, ws, h_t.reshape(B * T, -1), wt, student_bias=bs, teacher_bias=bt, impl=impl)
        loss.backward()
        t = mark("loss", t)
        h_s.backward(hs.grad.reshape_as(h_s))
        t = mark("student backward", t)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    mark("optimizer", t)
    return times


def profile(student0, teacher, x, bf16: bool, reps: int, min_s: float, rates: dict, bw: float) -> dict:
    """Median part times over ``reps`` steps, the kernel breakdown of one instrumented step, the floors."""
    student = copy.deepcopy(student0).train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
    impl = "chunked"
    with frozen_in_bf16(teacher, bf16):
        runs = [one_step(student, teacher, opt, params, x, bf16, impl) for _ in range(reps + 1)][1:]  # first: warm-up
        timer = KernelTimer()
        with timer:
            one_step(student, teacher, opt, params, x, bf16, impl, timer)
    part = {k: statistics.median(r[k] for r in runs) for k in PARTS}
    k_s, k_floor = defaultdict(float), defaultdict(float)  # (part, kind) -> kernel seconds, floor seconds
    for p, kind, key, flops, dt in timer.rows:
        k_s[p, kind] += dt
        k_floor[p, kind] += flops / gemm_rate(key, min_s, rates)
    n_tok, vocab = x.numel(), lm_head_params(student)[0].shape[0]
    n_params = sum(p.numel() for p in params)
    rows = {}
    for p in ("teacher forward", "student forward", "student backward"):
        rows[p] = (part[p], k_floor[p, "gemm"] + k_floor[p, "attention"])
    rows["loss GEMMs"] = (k_s["loss", "gemm"], k_floor["loss", "gemm"])
    rows["loss elementwise"] = (max(0.0, part["loss"] - k_s["loss", "gemm"]), 3.0 * n_tok * vocab * 4 / bw)
    rows["attention (inside the rows above)"] = (sum(v for (p, kind), v in k_s.items() if kind == "attention"),
                                                 sum(v for (p, kind), v in k_floor.items() if kind == "attention"))
    rows["optimizer"] = (part["optimizer"], 28.0 * n_params / bw)
    step = sum(part.values())
    floor = sum(f for name, (_, f) in rows.items() if not name.startswith("attention"))
    return {"precision": "bf16 autocast, teacher weights bf16" if bf16 else "fp32", "parts": rows, "step_s": step,
            "floor_s": floor, "tok_s": n_tok / step, "part_s": part,
            "gemm_tflop": sum(r[3] for r in timer.rows) / 1e12}


def distill_tok_s(student0, teacher, train, work: Path, tok, batch: int, seq: int, steps: int, threads: int,
                  **cfg_kw) -> float:
    """tokens/s of real ``minitron.distill`` steps (median of the Trainer's own figure, first step left out)."""
    out = Path(tempfile.mkdtemp(dir=work))
    cfg = DistillConfig(steps=steps, seq_len=seq, batch_size=batch, warmup_steps=1, save_every=None, eval_every=None,
                        plot=False, progress=False, resume=False, output_dir=str(out), threads=threads, **cfg_kw)
    t0 = time.perf_counter()
    minitron.distill(copy.deepcopy(student0), teacher, train, None, config=cfg, tokenizer=tok)
    print(f"distill {cfg_kw}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if r.get("split") == "train" and r["step"] > 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="builtin-tiny teacher, 4 x 64 tokens (seconds; a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per precision (default 3 quick, 2 real)")
    p.add_argument("--work", default="out/bench-distill-step")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "distill_step_profile"))
    args = p.parse_args(argv)
    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    model, batch, seq, calib = ("builtin-tiny", 4, 64, 8) if args.quick else ("smollm2-135m", 8, 256, 64)
    reps, min_s = args.reps or (3 if args.quick else 2), 0.05 if args.quick else 0.3
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    teacher, tok = load_model(model)
    teacher.eval().requires_grad_(False)
    blocks = load_text_blocks([builtin_text("train")], tok, seq)
    student = minitron.prune(teacher, blocks[:calib], params=0.5, verbose=False, progress=False)
    train = blocks[: 8 * batch]  # the same blocks for every run (and the teacher cache)
    x = train[:batch]
    rates: dict = {}
    bw = copy_bandwidth(min_s)
    results = []
    for bf16 in (False, True):
        t0 = time.perf_counter()
        results.append(profile(student, teacher, x, bf16, reps, min_s, rates, bw))
        print(f"profile bf16={bf16}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    cache = work / "teacher-cache"
    if not (cache / "manifest.json").is_file():
        minitron.cache_teacher_logits(teacher, train, cache, top_k=64, tokenizer=tok, seq_len=seq, batch_size=batch)
    n = 1 + max(2, reps)
    tok_s = {"fp32": distill_tok_s(student, teacher, train, work, tok, batch, seq, n, threads, mixed_precision="fp32"),
             "bf16": distill_tok_s(student, teacher, train, work, tok, batch, seq, n, threads, mixed_precision="bf16"),
             "naive loss (fp32)": distill_tok_s(student, teacher, train, work, tok, batch, seq, n, threads, mixed_precision="fp32",
                                                loss_impl="naive"),
             "offline teacher cache, top-64 (bf16)": distill_tok_s(student, str(cache), train, work, tok, batch, seq, n, threads,
                                                                    mixed_precision="bf16", top_k=64)}
    meta = {"command": "python benchmarks/distill_step_profile.py" + (" --quick" if args.quick else ""),
            "teacher": model, "student": "prune(teacher, params=0.5)", "tokens_per_step": f"{batch} x {seq}",
            "threads": threads, "physical_cores": physical_cores(), "cpu": cpu_name(), "fast_bf16": fast_bf16_cpu(),
            "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg()), "copy_GBps": bw / 1e9,
            "torch": torch.__version__, "loss_impl_in_profile": "chunked",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "profiles": results, "distill_tok_s": tok_s,
         "gemm_rates_GFLOPs": {" ".join(map(str, k)): v / 1e9 for k, v in rates.items()}}, indent=1, default=str) + "\n")
    write_result(Path(args.out).with_suffix(".md"), report(meta, results, tok_s))
    print(report(meta, results, tok_s))
    return 0


def report(meta: dict, results: list[dict], tok_s: dict) -> str:
    lines = ["# One distillation step, part by part", "",
             f"Written by `{meta['command']}` on {meta['date']}: teacher {meta['teacher']}, student "
             f"{meta['student']}, {meta['tokens_per_step']} tokens per step, {meta['threads']} threads "
             f"({meta['physical_cores']} physical cores usable; {meta['cpu']}; fast bf16: {meta['fast_bf16']}), "
             f"torch {meta['torch']}. 1-minute load average {meta['load_avg_start'][0]:.2f} at the start, "
             f"{meta['load_avg_end'][0]:.2f} at the end"
             + (" - above the cores: the machine was shared and these figures mean nothing." if
                max(meta['load_avg_start'][0], meta['load_avg_end'][0]) > meta['physical_cores'] else "."),
             "", "Floors: GEMM and attention FLOPs at the rate measured in this run for the same dtype, shape and "
             f"transposition; loss elementwise and optimizer: bytes at the measured copy bandwidth "
             f"({meta['copy_GBps']:.1f} GB/s). Part times are medians of the timed steps (the profile runs the "
             f"`{meta['loss_impl_in_profile']}` loss); loss GEMMs and attention come from one instrumented step.", ""]
    for r in results:
        rows = [[name, f"{t:.3f}", f"{f:.3f}", f"{t / f:.1f}x" if f > 0 else "-"] for name, (t, f) in r["parts"].items()]
        rows.append(["step (sum of the parts)", f"{r['step_s']:.3f}", f"{r['floor_s']:.3f}", f"{r['step_s'] / r['floor_s']:.1f}x"])
        lines += [f"## {r['precision']}: {r['tok_s']:.0f} tok/s in the profiled step ({r['gemm_tflop']:.3f} TFLOP "
                  "of GEMMs and attention)", "", md_table(["part", "seconds", "floor (s)", "time / floor"], rows, "lrrr"), ""]
    lines += ["## tokens/s of whole `minitron.distill` steps (same run, same blocks)", "",
              md_table(["run", "tok/s"], [[k, f"{v:.0f}"] for k, v in tok_s.items()], "lr"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
