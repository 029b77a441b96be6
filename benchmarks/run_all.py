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
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# shapes per device: CPU sizes keep the whole suite within ~6 minutes on 2 shared cores
SIZES = {
    "cpu": {"acc": (4, 256, 768), "hook": dict(hidden=256, layers=4, batch=4, seq=256, iters=3),
            "kl": [(1024, 32000, 1024), (1024, 128256, 512)], "kl_chunk": 256,
            "gather": dict(layers=6, hidden=1024, ffn=2816), "calib": (128, 256), "distill": (4, 256, 9)},
    "cuda": {"acc": (8, 4096, 4096), "hook": dict(hidden=2048, layers=8, batch=4, seq=2048, iters=10),
             "kl": [(4096, 128256, 4096), (16384, 128256, 4096)], "kl_chunk": 1024,
             "gather": dict(layers=6, hidden=1024, ffn=2816), "calib": (256, 256), "distill": (8, 512, 20)},
}


def _peak_mb(device: str, base: float) -> float:
    import resource

    import torch

    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def _base_mem(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---- workers (run in a fresh subprocess: python run_all.py --worker NAME --spec JSON) -------------


MODEL = {"name": "builtin-tiny"}  # --model: the model of the prune / distill / calib rows
MODEL_SIZES = {  # per-model overrides of the CPU sizes (the 135M model is ~20x slower per token)
    "smollm2-135m": {"calib": (32, 256), "distill": (4, 256, 4), "calib_batches": (4, 8, 256)},
}


def worker_prune(device: str, inplace: bool, n_blocks: int, seq_len: int, model_name: str = "builtin-tiny") -> dict:
    """Calibrate the model on ``n_blocks`` x ``seq_len`` tokens and prune it to 50%."""
    import minitron
    from minitron.models import load_model
    from minitron.data import builtin_text

    model, tok = load_model(model_name, device=device)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    blocks = minitron.load_text_blocks([builtin_text("train")], tok, seq_len, n_blocks)
    import bench_gather as bg

    base = _base_mem(device)
    t0 = time.perf_counter()
    scores = minitron.collect_importance(model, blocks, minitron.ImportanceConfig(batch_size=8), progress=False)
    _sync(device)
    calib_peak = _peak_mb(device, base)
    # the prune step alone: CUDA peak stats / the kernel's VmHWM counter reset right before it
    base = _base_mem(device)
    hwm_reset = device == "cuda" or bg._reset_hwm()
    rss_before = bg._status_kb("VmRSS") / 1024
    t1 = time.perf_counter()
    pruned = minitron.prune(model, params=0.5, scores=scores, inplace=inplace, verbose=False)
    _sync(device)
    t2 = time.perf_counter()
    prune_peak = _peak_mb(device, base) if device == "cuda" else bg._status_kb("VmHWM") / 1024 - rss_before
    return {"calib_s": t1 - t0, "prune_s": t2 - t1, "calib_peak_mb": calib_peak, "peak_mb": prune_peak,
            "hwm_reset": hwm_reset, "params": minitron.count_parameters(pruned), "model_mb": model_mb}


def worker_calib(device: str, n_batches: int, batch: int, seq_len: int, model_name: str = "builtin-tiny") -> dict:
    """Tokens/s of the importance-hooked calibration pass vs a plain decoder pass, alternated per batch."""
    import statistics

    import torch

    import minitron
    from minitron.data import builtin_text
    from minitron.models import load_model

    model, tok = load_model(model_name, device=device)
    blocks = minitron.load_text_blocks([builtin_text("train")], tok, seq_len, n_batches * batch).to(device)
    cfg = minitron.ImportanceConfig(batch_size=batch)
    decoder = model.get_decoder()
    plain, hooked = [], []
    with torch.no_grad():
        decoder(input_ids=blocks[:batch], use_cache=False)  # warmup
        for i in range(n_batches):
            x = blocks[i * batch : (i + 1) * batch]
            for kind in (("plain", "hooked") if i % 2 == 0 else ("hooked", "plain")):
                _sync(device)
                t0 = time.perf_counter()
                if kind == "plain":
                    decoder(input_ids=x, use_cache=False)
                else:
                    minitron.collect_importance(model, x, cfg, progress=False)
                _sync(device)
                (plain if kind == "plain" else hooked).append(time.perf_counter() - t0)
    tokens = batch * seq_len
    p, h = statistics.median(plain), statistics.median(hooked)
    return {"plain_tok_s": tokens / p, "hooked_tok_s": tokens / h, "overhead": h / p,
            "pairs": [[round(a, 3), round(b, 3)] for a, b in zip(plain, hooked)]}


def worker_distill(device: str, loss_impl: str, batch: int, seq_len: int, steps: int,
                   model_name: str = "builtin-tiny") -> dict:
    """Distillation steps/s of a 50% random prune of the model (the teacher); the first step is warmup."""
    import tempfile

    import minitron
    from minitron.models import load_model
    from minitron.data import builtin_text

    teacher, tok = load_model(model_name, device=device)
    blocks = minitron.load_text_blocks([builtin_text("train")], tok, seq_len)
    if model_name == "builtin-tiny":
        target = minitron.Target(hidden_size=160, intermediate_size=496)
    else:
        target = minitron.target_for_budget(teacher, 0.5)
    student = minitron.prune(teacher, target=target, method="random", verbose=False)
    stamps: list[float] = []

    def cb(step, metrics, model) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    base = _base_mem(device)
    with tempfile.TemporaryDirectory() as out:
        cfg = minitron.DistillConfig(steps=steps, seq_len=seq_len, batch_size=batch, warmup_steps=1, save_every=None,
                                     eval_every=None, plot=False, progress=False, output_dir=out, resume=False,
                                     loss_impl=loss_impl)
        minitron.distill(student, teacher, blocks, config=cfg, callbacks=[cb])
    timed = len(stamps) - 1
    secs = stamps[-1] - stamps[0]
    return {"tok_s": batch * seq_len * timed / secs, "step_ms": 1e3 * secs / timed, "peak_mb": _peak_mb(device, base)}


WORKERS = {"prune": worker_prune, "distill": worker_distill, "calib": worker_calib}


THREADS = {"n": 0}  # torch CPU threads of the suite and its subprocesses (0 = torch default)


def _subprocess(cmd: list[str], timeout: float = 900) -> tuple[dict | None, str]:
    """Run ``cmd``; returns (parsed JSON result, error text)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    if THREADS["n"]:
        env["OMP_NUM_THREADS"] = str(THREADS["n"])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in reversed(r.stdout.strip().splitlines()):
        line = line.removeprefix("RESULT ").strip()
        if line.startswith("{"):
            return json.loads(line), ""
    return None, ((r.stderr.strip().splitlines() or ["?"])[-1])[:100]


def _worker(name: str, **spec) -> tuple[dict | None, str]:
    return _subprocess([sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)])


# ---- the suite ---------------------------------------------------------------------------------


class Table:
    """Rows of the one results table."""

    HEAD = ("| benchmark | variant | setting | time | vs baseline | extra peak MiB | vs baseline | note |\n"
            "|---|---|---|---:|---:|---:|---:|---|")

    def __init__(self) -> None:
        self.rows: list[str] = []

    def add(self, bench: str, variant: str, setting: str, time_s: str, t_ratio: float | None = None,
            peak: float | None = None, p_ratio: float | None = None, note: str = "") -> None:
        r = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        self.rows.append(f"| {bench} | {variant} | {setting} | {time_s} | {r(t_ratio)} | {r(peak, 0)} | "
                         f"{r(p_ratio)} | {note} |")
        print(self.rows[-1], flush=True)

    def markdown(self) -> str:
        return self.HEAD + "\n" + "\n".join(self.rows)


def bench_importance(dev: str, sz: dict, table: Table) -> None:
    import torch

    import bench_importance as bi
    from minitron.importance.aggregate import accumulate_, block_importance_update_

    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    b, s, d = sz["acc"]
    act = torch.randn(b, s, d, device=dev, dtype=dtype)
    out = torch.randn(b, s, d, device=dev, dtype=dtype)
    impls = ["reference"] + (["triton"] if dev == "cuda" else [])
    for name, fn in (("accumulate_", lambda impl: accumulate_(sx, sx2, act, "mean", impl=impl)),
                     ("block_importance_update_", lambda impl: block_importance_update_(sc, act, out, impl=impl))):
        base = None
        for impl in impls:
            sx, sx2, sc = (torch.zeros(d, device=dev), torch.zeros(d, device=dev), torch.zeros(1, device=dev))
            fn(impl)
            reps = 20 if dev == "cuda" else 5
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(impl)
            _sync(dev)
            ms = (time.perf_counter() - t0) / reps * 1e3
            base = base or ms
            table.add(f"importance `{name}`", impl, f"{b}x{s}x{d} {str(dtype)[6:]}", f"{ms:.2f} ms", ms / base,
                      note="" if dev == "cuda" else "Triton not timed on CPU (interpreter only)")
    # hooked forward of a small Llama (bench_importance.add_hooks / timed)
    from transformers import LlamaConfig, LlamaForCausalLM

    h = sz["hook"]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=h["hidden"], intermediate_size=h["hidden"] * 11 // 4,
                      num_hidden_layers=h["layers"], num_attention_heads=max(h["hidden"] // 64, 1),
                      num_key_value_heads=max(h["hidden"] // 256, 1), max_position_embeddings=h["seq"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (h["batch"], h["seq"]), device=dev)
    plain = bi.timed(model, ids, h["iters"], dev)
    # NB: a full forward including a 32000-vocab lm_head, hooked per site with accumulate_; the honest
    # calibration comparison (decoder only, minitron's batched hooks) is the `calib` row and
    # benchmarks/calib_inplace_real.py
    setting = f"Llama h={h['hidden']} L={h['layers']}, {h['batch']}x{h['seq']}, forward incl. lm_head"
    table.add("importance hooks, forward", "plain (no hooks)", setting, f"{plain:.1f} ms", 1.0)
    for impl in impls:
        handles, _ = bi.add_hooks(model, impl)
        hooked = bi.timed(model, ids, h["iters"], dev)
        for hd in handles:
            hd.remove()
        table.add("importance hooks, forward", f"hooked ({impl})", setting, f"{hooked:.1f} ms", hooked / plain,
                  note=f"overhead {100 * (hooked / plain - 1):+.0f}%")


def bench_fused_kl(dev: str, sz: dict, table: Table) -> None:
    impls = ["gemm", "naive", "chunked"]  # gemm = the GEMMs alone, first so every row can quote time / GEMMs
    if dev == "cuda":
        impls.append("triton")
        try:
            import liger_kernel  # noqa: F401

            impls.append("liger")
        except ImportError:
            table.add("fused KD loss", "liger", "-", "-", note="liger_kernel not installed")
    warmup, reps = (2, 5) if dev == "cuda" else (0, 1)
    for n, v, h in sz["kl"]:
        base = gemm = None
        for impl in impls:
            res, err = _subprocess([sys.executable, str(HERE / "bench_fused_kl.py"), "--worker", "--device", dev,
                                    "--impls", impl, "--n", str(n), "--v", str(v), "--h", str(h), "--chunk",
                                    str(sz["kl_chunk"]), "--warmup", str(warmup), "--reps", str(reps)])
            setting = f"N={n} V={v} H={h}"
            if res is None:
                table.add("fused KD loss fwd+bwd", impl, setting, "failed", note=err)
                continue
            if impl == "gemm":
                gemm = res
                continue
            base = base or res
            vs_gemm = f"{res['ms'] / gemm['ms']:.2f}x the GEMMs alone ({gemm['ms']:.0f} ms), " if gemm else ""
            table.add("fused KD loss fwd+bwd", res["path"], setting, f"{res['ms']:.0f} ms", res["ms"] / base["ms"],
                      res["peak_mb"], res["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None,
                      note=f"{vs_gemm}chunk {sz['kl_chunk']}, {'bf16' if dev == 'cuda' else 'fp32'}, reps {reps}")


def bench_gather(sz: dict, table: Table) -> None:
    import bench_gather as bg

    g = sz["gather"]
    base = None
    for variant in bg.VARIANTS:
        res, err = _subprocess([sys.executable, str(HERE / "bench_gather.py"), "--child", variant, "--scenarios",
                                "stack", "--layers", str(g["layers"]), "--hidden", str(g["hidden"]), "--ffn",
                                str(g["ffn"]), "--keep", "0.5"])
        setting = f"{g['layers']} layers h={g['hidden']} f={g['ffn']} fp32, keep 50%"
        if res is None:
            table.add("weight gathering (CPU)", variant, setting, "failed", note=err)
            continue
        base = base or res
        table.add("weight gathering (CPU)", variant, setting, f"{res['seconds']:.3f} s",
                  res["seconds"] / base["seconds"], res["extra_mb"],
                  res["extra_mb"] / base["extra_mb"] if base["extra_mb"] > 0 else None,
                  note=f"model {res['model_mb']:.0f} MB")


def bench_prune(dev: str, sz: dict, table: Table) -> None:
    n, s = sz["calib"]
    base = None
    for inplace in (False, True):
        res, err = _worker("prune", device=dev, inplace=inplace, n_blocks=n, seq_len=s, model_name=MODEL["name"])
        variant = "inplace=True" if inplace else "copy (inplace=False)"
        setting = f"{_model_label()} -> 50%, calib {n}x{s}"
        if res is None:
            table.add("end-to-end prune", variant, setting, "failed", note=err)
            continue
        base = base or res
        total = res["calib_s"] + res["prune_s"]
        table.add("end-to-end prune", variant, setting, f"{total:.2f} s", total / (base["calib_s"] + base["prune_s"]),
                  res["peak_mb"], res["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None,
                  note=f"calibration {res['calib_s']:.2f} s + prune {1e3 * res['prune_s']:.0f} ms "
                       f"(prune time vs copy {res['prune_s'] / base['prune_s']:.2f}); peak = prune step only "
                       f"(calibration peak {res['calib_peak_mb']:.0f} MiB)"
                       + ("" if res["hwm_reset"] else "; VmHWM reset unavailable, peak includes calibration")
                       + f"; model {res['model_mb']:.0f} MiB: calibration peak {res['calib_peak_mb'] / res['model_mb']:.2f}x, "
                         f"prune-step peak {res['peak_mb'] / res['model_mb']:.2f}x the model's bytes")


def _model_label() -> str:
    return {"builtin-tiny": "built-in 7.3M", "smollm2-135m": "SmolLM2-135M"}.get(MODEL["name"], MODEL["name"])


def bench_calib(dev: str, sz: dict, table: Table) -> None:
    n, b, s = sz.get("calib_batches", (8, 8, 256))
    res, err = _worker("calib", device=dev, n_batches=n, batch=b, seq_len=s, model_name=MODEL["name"])
    setting = f"{_model_label()}, {n} batches of {b}x{s}, alternated"
    if res is None:
        table.add("calibration pass", "hooked vs plain", setting, "failed", note=err)
        return
    table.add("calibration pass", "plain decoder (no hooks, no lm_head)", setting, f"{res['plain_tok_s']:.0f} tok/s", 1.0)
    table.add("calibration pass", "importance hooks (collect_importance)", setting, f"{res['hooked_tok_s']:.0f} tok/s",
              res["overhead"], note=f"median time ratio; overhead {100 * (res['overhead'] - 1):+.1f}%")


def bench_distill(dev: str, sz: dict, table: Table) -> None:
    b, s, steps = sz["distill"]
    impls = ["naive", "chunked"] + (["triton"] if dev == "cuda" else [])
    base = None
    for impl in impls:
        res, err = _worker("distill", device=dev, loss_impl=impl, batch=b, seq_len=s, steps=steps,
                           model_name=MODEL["name"])
        setting = f"{_model_label()} teacher, its 50% prune as student, {b}x{s} tokens, {steps - 1} timed steps"
        if res is None:
            table.add("distill step", f"loss_impl={impl}", setting, "failed", note=err)
            continue
        base = base or res
        table.add("distill step", f"loss_impl={impl}", setting, f"{res['tok_s']:.0f} tok/s",
                  base["tok_s"] / res["tok_s"], res["peak_mb"],
                  res["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else None,
                  note=f"{res['step_ms']:.0f} ms/step; time ratio = naive tok/s / this")


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
    sys.path.insert(0, str(HERE))
    import torch

    THREADS["n"] = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if THREADS["n"]:
        torch.set_num_threads(THREADS["n"])
    if args.worker:
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
        import bench_gather as bg

        hw = f"{bg._cpu_name()} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()})"
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
    out = Path(args.out) if args.out else RESULTS / f"suite_{args.device}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
