"""Calibration and in-place pruning on checkpoints loaded the way users load them (issue #16).

Every model is saved with ``save_pretrained`` and reloaded with stock
``AutoModelForCausalLM.from_pretrained``, which memory-maps the safetensors file (the weights'
storage cannot be resized). Models:

- ``builtin-tiny``: minitron's built-in 7.3M Llama (hidden 256, 8 layers, vocab 4096; its own tokenizer);
- ``smollm2-135m``: the real SmolLM2-135M-Instruct (``minitron.load_model``), fp32;
- ``0.5b``: a Llama with Qwen2.5-0.5B's shape (hidden 896, FFN 4864, 24 layers, 14/2 heads,
  vocab 151936, tied), random weights, fp32;
- ``1.2b``: a Llama with Llama-3.2-1B's shape (hidden 2048, FFN 8192, 16 layers, 32/8 heads,
  vocab 128256, tied), random weights, fp32.

Parts (each measurement in a fresh subprocess, ``OMP_NUM_THREADS`` = ``--threads``):

1. ``hooks``: the importance-hooked calibration pass (``collect_importance`` on one batch, its
   per-call setup included) vs a plain no-grad pass of the same batch through the decoder (no
   lm_head), alternated pass by pass in one process. Wall time and the calling thread's CPU
   time (``time.thread_time``: unaffected by time spent descheduled on a shared machine) are both
   reported, as the median over pairs of hooked / plain.
2. ``memory``: peak RSS of ``minitron.prune(model, blocks, params=0.5, inplace=...)`` (one call:
   calibration + pruning) over the model's bytes, and of the pruning step alone
   (``prune(scores=...)`` after ``collect_importance``), for ``inplace`` False / True. Peaks are
   ``VmHWM`` (reset right before the measured call) minus the RSS *before the model was loaded*,
   so 1.00x means "the model and nothing else".
3. ``convergence`` (SmolLM2 only): one calibration pass over ``N`` samples whose running sums are
   snapshotted after every batch, so the kept sets for any prefix (8, 16, ..., N/2 samples) and for
   a disjoint second draw come from the same pass. Reported: overlap (|A & B| / k) of the kept
   FFN neurons (mean over layers), query heads, hidden channels and layers with the kept sets of
   all N samples, and between two disjoint draws of n samples.

Usage:
    python benchmarks/calib_inplace_real.py                      # all parts, all models (~1.5 h on 2 shared cores)
    python benchmarks/calib_inplace_real.py --models smollm2-135m --parts hooks
    python benchmarks/calib_inplace_real.py --render             # rewrite the markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from common import RESULTS, reset_hwm, run_worker, status_kb

HERE = Path(__file__).resolve().parent

SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.2b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
# per model: hook pairs (batch x seq), memory run (samples, batch), the cost of one 8x256 batch grows ~10x per row
PLAN = {
    "builtin-tiny": {"hooks": (16, 8, 256), "memory": (32, 8, 256)},
    "smollm2-135m": {"hooks": (8, 8, 256), "memory": (16, 8, 256)},
    "0.5b": {"hooks": (4, 4, 256), "memory": (16, 8, 256)},
    "1.2b": {"hooks": (3, 2, 256), "memory": (8, 8, 256)},
}


# ---- memory probes ---------------------------------------------------------------------------


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _blocks(ckpt: str, n: int, seq_len: int):
    import minitron
    from minitron.models import BUILTIN, load_tokenizer, text_source

    return minitron.load_text_blocks(text_source(BUILTIN), load_tokenizer(ckpt), seq_len, n)


def _load(ckpt: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt).eval()


# ---- workers (fresh subprocess each) -----------------------------------------------------------


def worker_make(name: str, out: str) -> dict:
    """Write the checkpoint (and SmolLM2's tokenizer, which also serves the random-weight shapes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import minitron

    model, tok = minitron.load_model("builtin-tiny" if name == "builtin-tiny" else "smollm2-135m")
    if name in SHAPES:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[name], max_position_embeddings=4096))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"params": sum(p.numel() for p in model.parameters())}


def _time_hook_methods() -> list:
    """Wrap the methods of CalibrationHooks that run per site / layer / batch with a CPU-time counter."""
    try:
        from minitron.importance.hooks import CalibrationHooks
    except ImportError:  # a minitron without the batched hooks (e.g. to time the previous version)
        return [None]
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.thread_time() - t0
        return wrapper

    for name in ("_site", "_block", "begin_batch", "end_batch"):
        setattr(CalibrationHooks, name, timed(getattr(CalibrationHooks, name)))
    return spent


def worker_hooks(ckpt: str, pairs: int, batch: int, seq_len: int) -> dict:
    """Hooked calibration pass vs plain decoder pass, alternated; wall and thread CPU time."""
    import torch

    import minitron

    model = _load(ckpt)
    blocks = _blocks(ckpt, (pairs + 1) * batch, seq_len)
    cfg = minitron.ImportanceConfig(batch_size=batch)  # what prune() calibrates when heads are not pruned
    cfg_heads = minitron.ImportanceConfig(batch_size=batch, head_output=True)  # + per-head output norms
    decoder = model.get_decoder()
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "hooked": [], "heads": []}
    spent = _time_hook_methods()  # CPU seconds inside the hooks' own code, [None] for older minitron
    hook_cpu: list[float] = []

    def run(kind: str, x) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.thread_time()
        if kind == "plain":
            decoder(input_ids=x, use_cache=False)
        elif kind == "heads":
            minitron.collect_importance(model, x, cfg_heads, progress=False)
        else:
            before = spent[0] or 0.0
            minitron.collect_importance(model, x, cfg, progress=False)
            hook_cpu.append((spent[0] or 0.0) - before)
        return time.perf_counter() - w0, time.thread_time() - c0

    with torch.no_grad():
        run("plain", blocks[:batch])  # warm-up both paths
        run("hooked", blocks[:batch])
        run("heads", blocks[:batch])
        order = ("plain", "hooked", "heads")
        for i in range(pairs):
            x = blocks[(i + 1) * batch : (i + 2) * batch]
            for kind in order[i % 3:] + order[: i % 3]:  # rotated, so no kind always runs first
                times[kind].append(run(kind, x))
    wall = [h[0] / p[0] for p, h in zip(times["plain"], times["hooked"])]
    cpu = [h[1] / p[1] for p, h in zip(times["plain"], times["hooked"])]
    share = [c / p[1] for p, c in zip(times["plain"], hook_cpu[1:])] if spent[0] is not None else []
    tokens = batch * seq_len
    med = lambda k, j: statistics.median(t[j] for t in times[k])  # noqa: E731
    heads_cpu = [h[1] / p[1] for p, h in zip(times["plain"], times["heads"])]
    return {"wall_ratio": statistics.median(wall), "cpu_ratio": statistics.median(cpu),
            "heads_cpu_ratio": statistics.median(heads_cpu), "heads_cpu_ratios": [round(r, 3) for r in heads_cpu],
            "wall_ratios": [round(r, 3) for r in wall], "cpu_ratios": [round(r, 3) for r in cpu],
            "hook_share": statistics.median(share) if share else None,
            "plain_tok_s": tokens / med("plain", 0), "hooked_tok_s": tokens / med("hooked", 0),
            "plain_tok_cpu_s": tokens / med("plain", 1), "hooked_tok_cpu_s": tokens / med("hooked", 1),
            "threads": torch.get_num_threads()}


def worker_memory(ckpt: str, inplace: bool, phase: str, n_samples: int, batch: int, seq_len: int) -> dict:
    """Peak RSS of one prune() call (phase ``whole``) or of its pruning step (phase ``step``)."""
    import gc

    import torch

    import minitron
    from minitron.heap import trim_heap
    from minitron.ops import mapped
    from minitron.ops.gather import gather_backend

    blocks = _blocks(ckpt, n_samples, seq_len)  # tokenised before the model is loaded
    gather_backend("cpu")  # load the C++ extension now, not inside the measured call
    gc.collect()
    # the baseline is live memory only: free heap left by tokenising would otherwise be reused by
    # (or, trimmed by prune(), credited to) the measured call
    trim_heap()
    r0 = status_kb("VmRSS")
    model = _load(ckpt)
    model_bytes = _model_bytes(model)
    n_mapped = sum(mapped.file_mapping(p) is not None for p in model.parameters())
    n_params = len(list(model.parameters()))
    cfg = minitron.ImportanceConfig(batch_size=batch)
    out = {"model_mb": model_bytes / 2**20, "mapped_params": f"{n_mapped}/{n_params}", "baseline": "live",
           "rss_loaded_mb": (status_kb("VmRSS") - r0) / 1024, "hwm_reset": reset_hwm()}
    t0 = time.perf_counter()
    if phase == "whole":
        pruned = minitron.prune(model, blocks, params=0.5, importance=cfg, seq_len=seq_len, num_samples=n_samples,
                                inplace=inplace, progress=False, verbose=False)
        out["seconds"] = time.perf_counter() - t0
    else:
        scores = minitron.collect_importance(model, blocks, cfg, progress=False)
        out["calib_s"] = time.perf_counter() - t0
        out["calib_peak_x"] = (status_kb("VmHWM") - r0) * 1024 / model_bytes
        gc.collect()
        r1 = status_kb("VmRSS")
        reset_hwm()
        t1 = time.perf_counter()
        pruned = minitron.prune(model, params=0.5, scores=scores, inplace=inplace, verbose=False)
        out["seconds"] = time.perf_counter() - t1
        out["step_extra_mb"] = (status_kb("VmHWM") - r1) / 1024
    out["peak_x"] = (status_kb("VmHWM") - r0) * 1024 / model_bytes
    out["after_x"] = (status_kb("VmRSS") - r0) * 1024 / model_bytes
    out["pruned_mb"] = _model_bytes(pruned) / 2**20
    out["same_object"] = pruned is model
    return out


def worker_convergence(ckpt: str, n_total: int, batch: int, seq_len: int, sizes: list[int]) -> dict:
    """Kept-set overlap vs number of calibration samples, from per-batch snapshots of one pass."""
    import torch

    import minitron
    from minitron.adapters import get_adapter
    from minitron.importance.collect import ImportanceScores, model_shape_meta
    from minitron.importance.hooks import CalibrationHooks
    from minitron.pruning import Target, make_plan

    model = _load(ckpt)
    blocks = _blocks(ckpt, n_total, seq_len)
    adapter = get_adapter(model)
    snaps = []  # cumulative (sum_x, sum_x2, bi_cos_sum, bi_count) after each batch
    t0 = time.perf_counter()
    with torch.no_grad(), CalibrationHooks(model, adapter, "mean") as hooks:
        for start in range(0, n_total, batch):
            hooks.begin_batch(*blocks[start : start + batch].shape)
            model.get_decoder()(input_ids=blocks[start : start + batch], use_cache=False)
            hooks.end_batch()
            snaps.append((hooks.sum_x.clone(), hooks.sum_x2.clone(), hooks.bi_cos_sum.clone(), hooks.bi_count))
    seconds = time.perf_counter() - t0
    zero = (torch.zeros_like(snaps[0][0]), torch.zeros_like(snaps[0][1]), torch.zeros_like(snaps[0][2]), 0)

    def scores(first: int, last: int) -> ImportanceScores:
        """Scores of samples [first, last) (multiples of the batch size): difference of snapshots."""
        a = snaps[first // batch - 1] if first else zero
        b = snaps[last // batch - 1]
        sx, sx2, bi, cnt = (b[i] - a[i] for i in range(4))
        n = last - first
        meta = {**model_shape_meta(model), "seq_agg": "mean", "num_samples": n, "seq_len": seq_len}
        sums = {s: (sx[o : o + d], sx2[o : o + d]) for s, (o, d) in hooks.offsets.items()}
        return ImportanceScores(meta=meta, sums=sums, counts={s: n for s in sums}, bi_cos_sum=bi, bi_count=cnt)

    c = model.config
    target = Target(hidden_size=c.hidden_size // 2 // c.num_attention_heads * c.num_attention_heads,
                    intermediate_size=c.intermediate_size // 2,
                    num_attention_heads=c.num_key_value_heads * max(1, c.num_attention_heads // c.num_key_value_heads * 2 // 3),
                    num_hidden_layers=c.num_hidden_layers * 3 // 4)

    def kept(s: ImportanceScores) -> dict:
        plan = make_plan(s, target, c)
        return {"hidden": set(plan.hidden.tolist()), "layers": set(plan.layers.tolist()),
                "ffn": {l: set(v.tolist()) for l, v in plan.mlp.items()},
                "heads": {l: set(v.tolist()) for l, v in plan.heads.items()}}

    def overlap(a: dict, b: dict) -> dict:
        per_layer = lambda k: statistics.mean(len(a[k][l] & b[k][l]) / len(a[k][l]) for l in a[k] if l in b[k])  # noqa: E731
        return {"ffn": per_layer("ffn"), "heads": per_layer("heads"),
                "hidden": len(a["hidden"] & b["hidden"]) / len(a["hidden"]),
                "layers": len(a["layers"] & b["layers"]) / len(a["layers"])}

    full = scores(0, n_total)
    ref = kept(full)
    ref_mlp, ref_heads, ref_hidden = full.mlp(), full.heads(), full.hidden()

    def score_recall(a: dict) -> dict:
        """Reference (all-sample) importance kept by ``a`` / the most any set of that size keeps."""
        def ratio(score, chosen, best):
            return float(score[sorted(chosen)].sum() / score[sorted(best)].sum())
        return {"ffn": statistics.mean(ratio(ref_mlp[l], a["ffn"][l], ref["ffn"][l]) for l in a["ffn"] if l in ref["ffn"]),
                "heads": statistics.mean(ratio(ref_heads[l], a["heads"][l], ref["heads"][l]) for l in a["heads"] if l in ref["heads"]),
                "hidden": ratio(ref_hidden, a["hidden"], ref["hidden"])}

    # held-out LM loss of the pruned model (no retraining) with the scores of n samples
    from minitron.models import BUILTIN, load_tokenizer, text_source

    valid = minitron.load_text_blocks(text_source(BUILTIN, "valid"), load_tokenizer(ckpt), seq_len, 16)

    # a milder target too: at ~50% without retraining the model is broken (loss ~10 vs ~2.5) and
    # which calibration "wins" there says little
    heads = c.num_attention_heads
    mild = Target(hidden_size=c.hidden_size * 7 // 8 // heads * heads, intermediate_size=c.intermediate_size * 3 // 4,
                  num_hidden_layers=c.num_hidden_layers - 2)

    def pruned_loss(s: ImportanceScores, t: Target) -> float:
        small = minitron.apply_plan(model, make_plan(s, t, c))
        return minitron.lm_loss(small, valid, batch_size=8)

    rows = []
    for n in sizes + [n_total]:
        mine = kept(scores(0, n))
        row = {"n": n, "vs_all": overlap(mine, ref), "score_recall": score_recall(mine),
               "loss": pruned_loss(scores(0, n), target), "loss_mild": pruned_loss(scores(0, n), mild)}
        if 2 * n <= n_total:  # two disjoint draws of n samples: [0, n) and [N - n, N)
            row["disjoint"] = overlap(mine, kept(scores(n_total - n, n_total)))
        rows.append(row)
    return {"rows": rows, "n_total": n_total, "seconds": seconds, "tok_s": n_total * seq_len / seconds,
            "target": {k: v for k, v in vars(target).items() if v is not None},
            "mild_target": {k: v for k, v in vars(mild).items() if v is not None},
            "unpruned_loss": minitron.lm_loss(model, valid, batch_size=8), "valid_tokens": int(valid.numel())}


WORKERS = {"make": worker_make, "hooks": worker_hooks, "memory": worker_memory, "convergence": worker_convergence}


# ---- driver ------------------------------------------------------------------------------------


def _run(worker: str, threads: int, timeout: float = 3600, **spec) -> dict:
    return run_worker(__file__, worker, spec, args=("--threads", str(threads)),
                      env={"OMP_NUM_THREADS": str(threads)}, timeout=timeout)


def checkpoint(name: str, root: Path, threads: int) -> str:
    path = root / name
    if not (path / "config.json").exists():
        print(f"[make] {name} -> {path}", flush=True)
        _run("make", threads, name=name, out=str(path))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="builtin-tiny,smollm2-135m,0.5b,1.2b")
    ap.add_argument("--parts", default="hooks,memory,convergence")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: steadier on a shared CPU)")
    ap.add_argument("--ckpt-dir", default="/tmp/minitron-bench-ckpt")
    ap.add_argument("--convergence-samples", type=int, default=256)
    ap.add_argument("--out", default=str(RESULTS / "calib_inplace_real.json"), help="results JSON (parts merge into it); "
                    "the markdown is written next to it")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from --out's JSON")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(WORKERS[args.worker](**json.loads(args.spec))), flush=True)
        return

    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    root = Path(args.ckpt_dir)
    for name in [] if args.render else args.models.split(","):
        ckpt = checkpoint(name, root, args.threads)
        res = results.setdefault(name, {})
        parts = args.parts.split(",")
        if "hooks" in parts:
            pairs, batch, seq = PLAN[name]["hooks"]
            res["hooks"] = {**_run("hooks", args.threads, ckpt=ckpt, pairs=pairs, batch=batch, seq_len=seq),
                            "batch": f"{pairs} pairs of {batch}x{seq}", "load": os.getloadavg()[0]}
            print(f"[hooks] {name}: {res['hooks']}", flush=True)
        if "memory" in parts:
            n, batch, seq = PLAN[name]["memory"]
            for inplace in (False, True):
                for phase in ("whole", "step"):
                    key = f"{'inplace' if inplace else 'copy'}_{phase}"
                    res[key] = {**_run("memory", args.threads, ckpt=ckpt, inplace=inplace, phase=phase, n_samples=n,
                                       batch=batch, seq_len=seq), "calib": f"{n}x{seq}, batch {batch}",
                                "load": os.getloadavg()[0]}
                    print(f"[memory] {name} {key}: {res[key]}", flush=True)
        if "convergence" in parts and name == "smollm2-135m":
            n = args.convergence_samples
            sizes = [s for s in (8, 16, 32, 64, 128, 256, 512) if s < n]
            res["convergence"] = {**_run("convergence", args.threads, ckpt=ckpt, n_total=n, batch=8, seq_len=256,
                                         sizes=sizes), "load": os.getloadavg()[0]}
            print(f"[convergence] {name}: {res['convergence']}", flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    md = render(results)
    out_path.with_suffix(".md").write_text(md)
    print(md)


def render(results: dict) -> str:
    """The markdown report of everything measured so far."""
    import platform

    lines = [f"# Calibration and in-place pruning on stock-loaded checkpoints ({platform.machine()} CPU, "
             f"{os.cpu_count()} cores shared)", "",
             "Models saved with `save_pretrained` and reloaded with stock `from_pretrained` (memory-mapped "
             "safetensors). 0.5b / 1.2b: Qwen2.5-0.5B / Llama-3.2-1B shapes with random weights. fp32, "
             "1 torch thread per worker. `load` = 1-minute load average when the row finished.", "",
             "## Hook overhead: hooked calibration pass / plain decoder pass (median over alternated pairs)", "",
             "Default calibration (what `prune()` runs unless it prunes heads by their output "
             "contribution); `+ head output`: with `ImportanceConfig(head_output=True)` (thread CPU time).", "",
             "| model | batches | wall | thread CPU time | + head output, CPU | CPU inside the hooks / plain pass | "
             "plain tok/s | hooked tok/s (calibration) | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results.items():
        h = res.get("hooks")
        if h:
            share = "-" if h.get("hook_share") is None else f"{100 * h['hook_share']:.1f}%"
            heads = f"{h['heads_cpu_ratio']:.3f}x" if "heads_cpu_ratio" in h else "-"
            lines.append(f"| {name} | {h['batch']} | {h['wall_ratio']:.3f}x | {h['cpu_ratio']:.3f}x | {heads} | {share} | "
                         f"{h['plain_tok_s']:.0f} | {h['hooked_tok_s']:.0f} | {h['load']:.1f} |")
    lines += ["", "## Peak RSS over the model's bytes (RSS before loading = 0)", "",
              "| model | model MiB | mode | whole prune() call | calibration alone | pruning step alone | "
              "step extra MiB | after | prune() s | load |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    stale = False
    for name, res in results.items():
        for mode in ("copy", "inplace"):
            w, s = res.get(f"{mode}_whole"), res.get(f"{mode}_step")
            if not (w and s):
                continue
            mark = "" if w.get("baseline") == "live" and s.get("baseline") == "live" else " *"
            stale = stale or bool(mark)
            lines.append(f"| {name}{mark} | {w['model_mb']:.0f} | {mode} | {w['peak_x']:.3f}x | {s['calib_peak_x']:.3f}x | "
                         f"{s['peak_x']:.3f}x | {s['step_extra_mb']:.0f} | {w['after_x']:.3f}x | {w['seconds']:.0f} "
                         f"({w['calib']}) | {w['load']:.1f} |")
    if stale:
        lines += ["", "\\* measured on earlier code: before prune() trimmed the C heap (minitron/heap.py) and before "
                  "the baseline RSS was taken on a trimmed heap (free heap left by tokenising was then counted in the "
                  "baseline and reused by the call)."]
    lines += ["", "Baseline: the C heap is trimmed (`malloc_trim`) right before the RSS baseline is read, so 1.00x is "
              "the model plus live memory only. `calibration alone`: `collect_importance` called directly (as "
              "before `prune(scores=...)`), which does not trim the heap; `prune()` trims it before every decoder "
              "layer during its own calibration and scoring, so its whole call can peak below that column (135M).", "",
              "Notes: in-place peaks can sit below 1.00x because calibration never reads the embedding rows of "
              "tokens absent from its text, so those file pages are never resident (the pruning step then reads "
              "them once, chunk by chunk: most of the in-place 'step extra'). The copy path holds the model and "
              "the pruned copy (~1.5x). The built-in 7.3M model's calibration activations at 8 x 256 tokens are "
              "~2x its 28 MiB, so no batch of that size fits 1.1x there. The 1.2b rows use one calibration batch "
              "(8 x 256 tokens) and 3 hook pairs of 2 x 256 tokens to stay within the shared CPU's time."]
    conv = results.get("smollm2-135m", {}).get("convergence")
    if conv:
        t = conv["target"]
        lines += ["", f"## Kept-set convergence vs calibration samples (SmolLM2-135M, 256-token blocks, target {t})", "",
                  f"Overlap |A & B| / k of the kept sets. `vs all`: with the kept sets of all {conv['n_total']} samples "
                  "(nested: the n samples are part of them). `disjoint`: two independent draws of n samples. "
                  f"Calibration ran at {conv['tok_s']:.0f} tok/s (load {conv['load']:.1f}; the hook table's tok/s are "
                  "the throughput figures).", "",
                  "| samples | FFN vs all | heads vs all | hidden vs all | layers vs all | FFN disjoint | heads disjoint "
                  "| hidden disjoint | layers disjoint | score recall FFN / heads / hidden | pruned held-out loss "
                  "| same, mild target |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for row in conv["rows"]:
            a, d = row["vs_all"], row.get("disjoint")
            dj = " | ".join(f"{d[k]:.3f}" for k in ("ffn", "heads", "hidden", "layers")) if d else "- | - | - | -"
            r = row.get("score_recall")
            rc = " / ".join(f"{r[k]:.4f}" for k in ("ffn", "heads", "hidden")) if r else "-"
            loss = f"{row['loss']:.3f}" if "loss" in row else "-"
            loss_mild = f"{row['loss_mild']:.3f}" if "loss_mild" in row else "-"
            lines.append(f"| {row['n']} | {a['ffn']:.3f} | {a['heads']:.3f} | {a['hidden']:.3f} | {a['layers']:.3f} | {dj} "
                         f"| {rc} | {loss} | {loss_mild} |")
        if "unpruned_loss" in conv:
            lines += ["", f"Score recall: the all-sample importance kept by the n-sample selection over the most a "
                      f"selection of that size can keep (1 = only ties swapped). Pruned held-out loss: "
                      f"`lm_loss` of the pruned model, no retraining, on {conv['valid_tokens']} tokens of the "
                      f"built-in `valid` split (unpruned: {conv['unpruned_loss']:.3f}); mild target: "
                      f"{conv.get('mild_target')}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
