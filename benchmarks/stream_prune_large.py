"""Streamed pruning of a checkpoint larger than this machine's RAM (issue #22, evidence b).

A random-init Llama-2-13B-shaped bf16 checkpoint (hidden 5120, FFN 13824, 42 layers, 40 heads, 32000-token
vocabulary, untied: ~13.6B parameters, ~27 GB) is written shard by shard, one layer in memory at a time
(``stream_prune.worker_make`` with this shape). It cannot be loaded here: the machine has 24 GiB of RAM. Then
``minitron.prune_checkpoint`` prunes it to about half (hidden 3840, FFN 9216, 36 layers; depth by Block
Importance) in a fresh process, from 8 calibration blocks of 128 token ids. Reported: peak RSS above the
imports (``VmHWM``), wall time, bytes read from the checkpoint. Last, a separate process loads the pruned
checkpoint (~14 GB, which fits) with stock ``from_pretrained`` and checks that its config is the target and
its logits on a few tokens are finite. Equality with the in-memory prune is what
``benchmarks/stream_prune.py`` and ``tests/test_stream_prune.py`` show on models that fit.

Usage (needs ~45 GB free disk; about 20-30 min on 2 cores):
    OMP_NUM_THREADS=2 python benchmarks/stream_prune_large.py [--work /tmp/minitron-stream-large]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import stream_prune as base
from common import RESULTS, md_table, write_result

SHAPE = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=42, num_attention_heads=40,
             num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
             dtype="bfloat16")
TARGET = dict(hidden_size=3840, intermediate_size=9216, num_hidden_layers=36)
SAMPLES, SEQ, BATCH = 8, 128, 4


def _use_this_shape() -> None:
    """Point the shared workers of ``stream_prune.py`` at this benchmark's shape, target and blocks."""
    base.SHAPE, base.TARGET = SHAPE, TARGET
    base.SAMPLES, base.SEQ, base.BATCH = SAMPLES, SEQ, BATCH


def worker_check(out: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    ids = base._blocks()[:1, :16]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"config": {k: getattr(cfg, k) for k in TARGET}, "params": sum(p.numel() for p in model.parameters()),
            "logits_finite": bool(torch.isfinite(logits).all()), "dtype": str(next(model.parameters()).dtype)}


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _mem_total_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/minitron-stream-large")
    p.add_argument("--worker", nargs="+")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete them at the end)")
    args = p.parse_args()
    _use_this_shape()
    if args.worker:
        name, *rest = args.worker
        fn = {"make": base.worker_make, "check": worker_check,
              "prune": lambda ckpt, out: base.worker_prune(ckpt, out, "streamed", "bi")}[name]
        print(json.dumps(fn(*rest)))
        return
    work = Path(args.work)
    ckpt, out = work / "ckpt", work / "pruned"
    make_s = None
    if not (ckpt / "config.json").is_file():
        started = time.time()
        _run("make", str(ckpt))
        make_s = time.time() - started
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    ram = _mem_total_bytes()
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    r = _run("prune", str(ckpt), str(out))
    check = _run("check", str(out))
    out_size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    rows = [[f"{size / 2**30:.1f}", f"{ram / 2**30:.1f}", f"{size / ram:.2f}x", f"{r['peak_mb'] / 1024:.2f}",
             f"{r['peak_mb'] * 2**20 / size:.3f}x", f"{r['seconds'] / 60:.1f}", f"{r['bytes_read'] / 2**30:.1f}",
             f"{r['bytes_read'] / size:.2f}x", f"{out_size / 2**30:.1f}"]]
    text = f"""# Streamed prune of a checkpoint larger than RAM (CPU, 2 cores)

Written by `benchmarks/stream_prune_large.py`. Random-init Llama shape {SHAPE}, written shard by shard
({'in ' + f'{make_s / 60:.1f} min' if make_s is not None else 'earlier'}); pruned by `minitron.prune_checkpoint`
to {TARGET} (depth by Block Importance), calibration {SAMPLES} blocks x {SEQ} token ids, batch {BATCH}, in a
fresh process. Peak = VmHWM minus the RSS after the imports ({r['import_mb']:.0f} MiB). Load average when the
prune started: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).

{md_table(["checkpoint GiB", "RAM GiB", "checkpoint / RAM", "peak above imports GiB", "peak / checkpoint",
           "wall min", "read GiB", "read / checkpoint", "pruned GiB"], rows)}

The pruned checkpoint, loaded by stock `from_pretrained` in another process: config
{check['config']}, {check['params'] / 1e9:.2f}B parameters ({check['dtype']}), logits finite:
**{check['logits_finite']}**.
"""
    write_result(RESULTS / "stream_prune_large.md", text)
    (RESULTS / "stream_prune_large.json").write_text(json.dumps(
        {"prune": r, "check": check, "checkpoint_bytes": size, "ram_bytes": ram, "make_s": make_s,
         "loadavg": load}, indent=2) + "\n")
    print(text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
