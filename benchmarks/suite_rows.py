"""The rows of ``run_all.py``: one function per benchmark group, each adding its rows to a :class:`Table`.

Heavy points run in fresh subprocesses (``bench_fused_kl.py --worker``, ``bench_gather.py --child``,
``run_all.py --worker``, see :mod:`suite_workers`) so their peak memory is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from common import HERE, md_head, md_row, sync

MODEL = {"name": "builtin-tiny"}  # --model: the model of the prune / distill / calib rows

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
    return _subprocess([sys.executable, str(HERE / "run_all.py"), "--worker", name, "--spec", json.dumps(spec)])


# ---- the suite ---------------------------------------------------------------------------------


class Table:
    """Rows of the one results table."""

    HEAD = md_head(["benchmark", "variant", "setting", "time", "vs baseline", "extra peak MiB", "vs baseline", "note"],
                   "lllrrrrl")

    def __init__(self) -> None:
        self.rows: list[str] = []

    def add(self, bench: str, variant: str, setting: str, time_s: str, t_ratio: float | None = None,
            peak: float | None = None, p_ratio: float | None = None, note: str = "") -> None:
        r = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        self.rows.append(md_row([bench, variant, setting, time_s, r(t_ratio), r(peak, 0), r(p_ratio), note]))
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
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(impl)
            sync(dev)
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
