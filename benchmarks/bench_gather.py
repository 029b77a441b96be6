"""Peak memory + time of pruning a synthetic weight stack: compact_ vs index_select.

Each variant runs in its own subprocess (fresh allocator, own peak-RSS counter):

* ``index_select-copy``   : build a pruned copy of every weight, then drop the originals
                            (what ``{k: w.index_select(...)} -> load_state_dict`` does)
* ``index_select-replace``: per weight ``w = w.index_select(0, r).index_select(1, c)``,
                            old weight freed right away (best case for the copy approach)
* ``compact_[cpu-ext]``   : in-place C++ compaction + realloc shrink
* ``compact_[torch]``     : in-place chunked pure-PyTorch fallback + ``resize_`` shrink

The synthetic model is ``--layers`` transformer blocks (fp32): q/k/v/o ``[H, H]``,
gate/up ``[F, H]``, down ``[H, F]``; pruning keeps ``--keep`` of the hidden and FFN
channels (rows and columns, so ~keep^2 of each matrix survives).

Peak extra memory = VmHWM during pruning - VmRSS right before pruning (the high-water mark
is reset via /proc/self/clear_refs when the kernel allows it, otherwise ru_maxrss is used).

Usage:  python benchmarks/bench_gather.py [--layers 6 --hidden 1024 --ffn 2816 --keep 0.5]
Scenarios: ``stack`` (above) and ``embedding`` (one ``[--vocab, --hidden]`` matrix, hidden
columns pruned; shows the transient of copy-based pruning on a single large tensor).
Writes markdown tables to benchmarks/results/gather_cpu.md (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from common import RESULTS, cpu_name, md_head, reset_hwm, status_kb, write_result

VARIANTS = ["index_select-copy", "index_select-replace", "compact_[cpu-ext]", "compact_[torch]"]


def _prune_copy(w, r, c):
    if r is not None:
        w = w.index_select(0, r)
    if c is not None:
        w = w.index_select(1, c)
    return w


def _child(variant: str, scenario: str, layers: int, hidden: int, ffn: int, vocab: int, keep: float,
           seed: int) -> dict:
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from minitron.ops.gather import compact_, gather_backend

    # weights: (tensor, row-index name, col-index name)
    dims = {"h": hidden, "f": ffn, "v": vocab}
    g = torch.Generator().manual_seed(seed)
    keep_idx = {n: torch.randperm(d, generator=g)[: int(d * keep)].sort().values for n, d in dims.items()}
    keep_idx["v"] = None  # vocabulary rows are never pruned
    if scenario == "stack":
        shapes = [("h", "h")] * 4 + [("f", "h")] * 2 + [("h", "f")]  # q,k,v,o, gate,up, down
        specs = shapes * layers
    else:  # "embedding": one big [vocab, hidden] matrix, prune hidden columns only
        specs = [("v", "h")]
    weights = [torch.randn(dims[r], dims[c]) for (r, c) in specs]
    model_bytes = sum(w.numel() * w.element_size() for w in weights)
    backend = None
    if variant.startswith("compact_"):
        backend = "torch" if variant == "compact_[torch]" else None
        if backend is None:
            assert gather_backend("cpu") == "cpu-ext", "C++ extension not available"
    # warm-up (loads the extension / index_select code paths) on a tiny tensor
    compact_(torch.randn(8, 8), 0, torch.tensor([1, 3]), backend=backend)

    rss_before = status_kb("VmRSS")
    hwm_reset = reset_hwm()
    t0 = time.perf_counter()
    if variant == "index_select-copy":
        pruned = [_prune_copy(w, keep_idx[r], keep_idx[c]) for w, (r, c) in zip(weights, specs)]
        del weights
        weights = pruned
        del pruned
    elif variant == "index_select-replace":
        for i, (r, c) in enumerate(specs):
            weights[i] = _prune_copy(weights[i], keep_idx[r], keep_idx[c])
    else:
        for i, (r, c) in enumerate(specs):
            for d, ix in ((0, keep_idx[r]), (1, keep_idx[c])):
                if ix is not None:
                    compact_(weights[i], d, ix, backend=backend)  # input re-pointed in place
    dt = time.perf_counter() - t0
    peak_kb = status_kb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    after_kb = status_kb("VmRSS")
    checksum = float(sum(w.double().sum() for w in weights))
    kept_bytes = sum(w.untyped_storage().nbytes() for w in weights)
    return {
        "variant": variant,
        "model_mb": model_bytes / 2**20,
        "kept_mb": kept_bytes / 2**20,
        "rss_before_mb": rss_before / 1024,
        "peak_mb": peak_kb / 1024,
        "rss_after_mb": after_kb / 1024,
        "extra_mb": (peak_kb - rss_before) / 1024,
        "seconds": dt,
        "checksum": checksum,
        "hwm_reset": hwm_reset,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=65536, help="rows of the 'embedding' scenario matrix")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--scenarios", default="stack,embedding")
    ap.add_argument("--repeats", type=int, default=1, help="subprocess runs per variant (best time, max peak)")
    ap.add_argument("--out", default=str(RESULTS / "gather_cpu.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.scenarios, a.layers, a.hidden, a.ffn, a.vocab, a.keep, seed=0)))
        return

    import torch

    text = "# compact_ vs index_select: peak memory and time of pruning (CPU)\n\n"
    text += (f"- CPU: {cpu_name()} ({os.cpu_count()} cores visible), torch {torch.__version__}, "
             f"Python {platform.python_version()}\n")
    text += ("- each variant runs in a fresh subprocess; extra = peak RSS (VmHWM, reset right before "
             "pruning) - RSS before pruning; time = wall time of the pruning loop "
             f"(best of {a.repeats})\n")
    text += ("- RSS counts what the process holds from the OS: memory freed back to glibc and reused "
             "is not counted twice, which is why per-weight index_select on many small weights looks cheap\n\n")
    for scen in [x for x in a.scenarios.split(",") if x]:
        text += _run_scenario(a, scen) + "\n"
    print(text)
    write_result(a.out, text)


def _run_scenario(a: argparse.Namespace, scen: str) -> str:
    rows = []
    for v in VARIANTS:
        runs = []
        for _ in range(a.repeats):
            cmd = [sys.executable, __file__, "--child", v, "--scenarios", scen, "--layers", str(a.layers),
                   "--hidden", str(a.hidden), "--ffn", str(a.ffn), "--vocab", str(a.vocab), "--keep", str(a.keep)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{scen}/{v}: FAILED\n{res.stderr[-2000:]}", file=sys.stderr)
                break
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        if runs:
            r = dict(runs[0])
            r["seconds"] = min(x["seconds"] for x in runs)
            r["extra_mb"] = max(x["extra_mb"] for x in runs)
            rows.append(r)
            print(f"{scen}/{v}: extra {r['extra_mb']:.1f} MB, {r['seconds']:.3f} s", file=sys.stderr)

    base = next((r for r in rows if r["variant"] == "index_select-copy"), rows[0])
    ok = all(abs(r["checksum"] - base["checksum"]) <= 1e-6 * max(1.0, abs(base["checksum"])) for r in rows)
    if scen == "stack":
        desc = (f"{a.layers} layers x (q,k,v,o [{a.hidden},{a.hidden}], gate,up [{a.ffn},{a.hidden}], "
                f"down [{a.hidden},{a.ffn}]); keep {a.keep:.0%} of hidden and FFN channels (rows and cols)")
    else:
        desc = f"one embedding-like matrix [{a.vocab},{a.hidden}]; keep {a.keep:.0%} of the hidden columns"
    lines = [
        f"## scenario `{scen}`: {desc}",
        "",
        f"- model {base['model_mb']:.1f} MB fp32 -> {base['kept_mb']:.1f} MB kept; "
        f"all variants give identical weights (checksum match: {ok})",
        "",
        md_head(["variant", "peak extra MB", "extra / model", "time s", "time vs index_select-copy"], "lrrrr"),
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['extra_mb']:.1f} | {r['extra_mb'] / r['model_mb']:.1%} | {r['seconds']:.3f} | "
            f"{r['seconds'] / base['seconds']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
