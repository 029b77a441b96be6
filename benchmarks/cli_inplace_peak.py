"""``minitron prune --inplace`` vs ``minitron.prune(..., inplace=True)``: the same peak RSS (issue #24).

A Llama-shaped model with random weights (hidden 768, 8 layers, FFN 2048, 12/4 heads, the built-in
model's 4096-token vocabulary, untied; 56.6M parameters, fp32) is saved with ``save_pretrained`` and the
built-in tokenizer. Each run is a fresh subprocess that loads it with :func:`minitron.load_model` (what
the command does), prunes it in place to ``hidden 576, FFN 1024`` on 16 x 128 tokens of the built-in text
and writes the pruned checkpoint: once through the command line (``minitron.cli.main``), once through the
API (``minitron.prune`` + ``save_pretrained``). Peak = the process's ``ru_maxrss`` minus its RSS after the
imports (before loading), over the model's bytes. ``--code DIR`` runs the command line of another checkout
(e.g. the code before the command called ``minitron.prune``) for a contrast row.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/cli_inplace_peak.py [--code /path/to/old/checkout]   # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

from common import RESULTS, md_table, run_worker, status_kb, write_result

HERE = Path(__file__).resolve().parent
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=False)
TARGET = dict(hidden_size=576, intermediate_size=1024)
SAMPLES, SEQ = 16, 128


def worker_make(out: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitron.data import BUILTIN_MODEL
    from minitron.models import load_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.save_pretrained(out)
    load_tokenizer(BUILTIN_MODEL).save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters()),
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def worker_prune(ckpt: str, out: str, via: str) -> dict:
    import minitron
    from minitron.cli import main
    from minitron.models import BUILTIN, text_source
    from minitron.ops.gather import gather_backend

    gather_backend("cpu")  # the C++ extension loaded before the baseline, in both runs
    base_kb = status_kb("VmRSS")
    if via == "cli":
        # the older flag names (deprecated aliases now), which both checkouts of a --code comparison take
        flags = ["--hidden-size", str(TARGET["hidden_size"]), "--ffn", str(TARGET["intermediate_size"])]
        rc = main(["prune", "--model", ckpt, "--calib", "builtin", "--num-samples", str(SAMPLES), "--seq-len", str(SEQ),
                   *flags, "--inplace", "--no-progress", "--out", out])
        assert rc == 0, rc
        same_object = None
    else:
        model, tokenizer = minitron.load_model(ckpt, dtype="float32")
        pruned = minitron.prune(model, text_source(BUILTIN), minitron.Target(**TARGET), tokenizer=tokenizer,
                                inplace=True, progress=False, verbose=False,
                                **_config_kwargs(minitron))
        pruned.save_pretrained(out)
        tokenizer.save_pretrained(out)
        same_object = pruned is model
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "same_object": same_object}


def _config_kwargs(minitron) -> dict:
    """The calibration options as this checkout takes them (PruneConfig, or the older keywords)."""
    if hasattr(minitron, "PruneConfig"):
        return {"config": minitron.PruneConfig(num_samples=SAMPLES, seq_len=SEQ)}
    return {"num_samples": SAMPLES, "seq_len": SEQ}


def _run(worker: str, code: Path, **spec) -> dict:
    return run_worker(__file__, worker, spec, code=code, cwd=code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--spec")
    ap.add_argument("--code", default=None, help="another checkout whose command line is measured as well")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each path (the table shows each run)")
    args = ap.parse_args()
    if args.worker:
        fn = {"make": worker_make, "prune": worker_prune}[args.worker]
        print("RESULT " + json.dumps(fn(**json.loads(args.spec))), flush=True)
        return
    here = HERE.parent
    runs = [("command line (`minitron prune --inplace`)", "cli", here), ("API (`prune(inplace=True)`)", "api", here)]
    if args.code:
        runs.append((f"command line of {args.code}", "cli", Path(args.code).resolve()))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        ckpt = str(Path(root) / "llama-62m")
        made = _run("make", here, out=ckpt)
        mb = made["model_bytes"] / 2**20
        for i in range(args.repeat):
            for label, via, code in runs:
                r = _run("prune", code, ckpt=ckpt, out=str(Path(root) / f"out-{via}-{i}-{len(rows)}"), via=via)
                rows.append([label, f"{mb:.0f}", f"{r['base_mb']:.0f}", f"{r['peak_mb']:.0f}",
                             f"{(r['peak_mb'] - r['base_mb']) / mb:.3f}x"])
                print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    text = "\n".join([
        "# `minitron prune --inplace` vs `minitron.prune(inplace=True)`: peak RSS (x86_64 CPU, 2 shared cores)",
        "",
        f"Llama shape {SHAPE} ({made['params'] / 1e6:.1f}M parameters, random weights, fp32), loaded with "
        f"`minitron.load_model`, pruned in place to {TARGET} on {SAMPLES} x {SEQ} tokens of the built-in text, "
        f"written with `save_pretrained`. Load average {load:.1f}. Written by `benchmarks/cli_inplace_peak.py`.",
        "",
        md_table(["path", "model MiB", "RSS after imports MiB", "peak RSS MiB (ru_maxrss)", "peak above imports / model"],
                 [*rows], "lrrrr"),
        "",
        "The command builds a `Target` and a `PruneConfig` and calls `minitron.prune`, so both paths run the same "
        "calibration (under `heap.trimmed_layers`), page release and in-place surgery.",
        "",
    ])
    write_result(RESULTS / "cli_inplace_peak.md", text)
    print(text)


if __name__ == "__main__":
    main()
