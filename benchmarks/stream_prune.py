"""Streamed vs in-memory pruning of a checkpoint: peak RSS, equality of the results (issue #22).

A random-init Llama-shaped bf16 checkpoint (hidden 2048, FFN 5632, 14 layers, 16/4 heads, 32000-token
vocabulary, untied: ~0.76B parameters, ~1.5 GB) is written shard by shard (one layer in memory at a
time; the benchmark never builds the model). Then, each in a fresh subprocess:

- ``in-memory``: stock ``AutoModelForCausalLM.from_pretrained`` + ``minitron.prune(inplace=True)`` +
  ``save_pretrained``;
- ``streamed``: ``minitron.prune_checkpoint``;

both with the same target (hidden 1536, FFN 4096, 12 layers), the same 16 calibration blocks of 256 token
ids, once with Block Importance for depth (``bi``) and once with the layer-drop loss (``ppl``, the default,
streamed by :mod:`minitron.streaming.depth`). Peak RSS = ``VmHWM`` of the worker minus its RSS after the
imports (the import baseline), over the checkpoint's bytes. A last worker reloads both outputs with
stock ``from_pretrained`` and compares every tensor and the logits. The table of expected peaks for
Llama-3.1-8B / 70B shapes is :func:`minitron.streaming.expected_peak_bytes` (the formula the README
quotes), next to its prediction for the measured model.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/stream_prune.py [--work /tmp/stream-bench]   # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, md_table, status_kb, write_result

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=14, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
             dtype="bfloat16")
TARGET = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12)
SAMPLES, SEQ, BATCH = 16, 256, 4
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256)


def worker_make(path: str) -> dict:
    """Write the ``SHAPE`` checkpoint one shard per layer (plus embedding / head shards), each generated, saved
    and freed before the next: the generator holds one layer, whatever the model's size."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPE)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def shard(i):  # (name -> tensor) of shard i: 0 = embedding, 1..L = layers, L+1 = final norm + head
        if i == 0:
            return {"model.embed_tokens.weight": rand(v, d)}
        if i == config.num_hidden_layers + 1:
            return {"model.norm.weight": torch.ones(d, dtype=torch.bfloat16), "lm_head.weight": rand(v, d)}
        p = f"model.layers.{i - 1}."
        return {p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                p + "mlp.down_proj.weight": rand(d, f),
                p + "input_layernorm.weight": (1 + rand(d).float()).to(torch.bfloat16),
                p + "post_attention_layernorm.weight": (1 + rand(d).float()).to(torch.bfloat16)}

    n = config.num_hidden_layers + 2
    weight_map, total = {}, 0
    for i in range(n):
        tensors = shard(i)
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config.save_pretrained(out)
    return {"bytes": total}


def _blocks():
    import torch

    return torch.randint(0, SHAPE["vocab_size"], (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


def worker_prune(ckpt: str, out: str, mode: str, depth: str) -> dict:
    import gc

    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM

    import minitron
    from minitron.ops.gather import gather_backend

    gather_backend("cpu")  # the C++ extension loaded before the measured part
    blocks = _blocks()
    target = minitron.Target(**TARGET)
    options = dict(importance=minitron.ImportanceConfig(batch_size=BATCH), depth_metric=depth, progress=False)
    gc.collect()
    base = status_kb("VmRSS")
    started = time.time()
    read = None
    if mode == "in-memory":
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        minitron.prune(model, blocks, target, inplace=True, **options).save_pretrained(out)
    else:
        from minitron.streaming import prune as stream_prune

        reads = []
        real = stream_prune.CheckpointReader

        class Counting(real):  # the bytes the run reads from the checkpoint
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                reads.append(self)

        stream_prune.CheckpointReader = Counting
        minitron.prune_checkpoint(ckpt, out, blocks, target, **options)
        read = reads[0].bytes_read
    return {"import_mb": base / 1024, "peak_mb": (status_kb("VmHWM") - base) / 1024, "seconds": time.time() - started,
            "bytes_read": read}


def worker_phases(ckpt: str, out: str) -> dict:
    """The streamed prune's two phases measured apart: calibration, then the surgery (VmHWM reset between)."""
    import torch

    import minitron
    from minitron.ops.gather import gather_backend
    from minitron.pruning import make_plan
    from minitron.streaming import CheckpointReader, skeleton, streamed_importance
    from minitron.streaming.write import plan_tensors, write_shards

    from common import reset_hwm

    gather_backend("cpu")
    blocks = _blocks()
    base = status_kb("VmRSS")
    reader = CheckpointReader(ckpt)
    model = skeleton(ckpt, None, reader)
    reset_hwm()
    scores = streamed_importance(reader, model, blocks, minitron.ImportanceConfig(batch_size=BATCH), progress=False)
    calibration, after = status_kb("VmHWM") - base, status_kb("VmRSS") - base
    reset_hwm()
    plan = make_plan(scores, minitron.Target(**TARGET), model.config, depth_metric="bi")
    Path(out).mkdir(parents=True)
    write_shards(reader, model, plan_tensors(reader, model, plan), Path(out), 5 << 30)
    return {"calibration_mb": calibration / 1024, "after_calibration_mb": after / 1024,
            "write_mb": (status_kb("VmHWM") - base) / 1024, "threads": torch.get_num_threads()}


def worker_compare(a: str, b: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = _blocks()[:2, :64]
    with torch.no_grad():
        la, lb = ma(input_ids=ids).logits, mb(input_ids=ids).logits
    return {"tensors_equal": same, "logits_equal": bool(torch.equal(la, lb)),
            "max_abs_diff": float((la.float() - lb.float()).abs().max()), "dtype": str(next(mb.parameters()).dtype)}


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def expected_rows() -> list[list[object]]:
    from transformers import LlamaConfig

    from minitron.streaming import expected_peak_bytes

    rows = []
    for name, shape, samples in (("benchmark model (above)", SHAPE, SAMPLES), ("Llama-3.1-8B", LLAMA_8B, 64),
                                 ("Llama-3.1-8B", LLAMA_8B, 1024), ("Llama-3.1-70B", LLAMA_70B, 64),
                                 ("Llama-3.1-70B", LLAMA_70B, 1024)):
        config = LlamaConfig(**{k: v for k, v in shape.items() if k != "dtype"})
        e = expected_peak_bytes(config, samples, SEQ, BATCH, weight_bytes=2, act_bytes=2)
        ckpt = (config.num_hidden_layers * e["layer"] + 2 * config.vocab_size * config.hidden_size * 2)
        rows.append([name, f"{samples} x {SEQ}", f"{ckpt / 2**30:.1f}", f"{e['layer'] / 2**30:.2f}",
                     f"{e['cached_hidden'] / 2**30:.2f}", f"{e['batch_working_set'] / 2**30:.2f}",
                     f"{e['read_pages'] / 2**30:.2f}", f"{e['write_pass'] / 2**30:.2f}",
                     f"{e['total'] / 2**30:.2f}", f"{e['total'] / ckpt:.3f}x"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/minitron-stream-bench")
    p.add_argument("--worker", nargs="+")
    p.add_argument("--phases", action="store_true", help="only measure the streamed prune's two phases apart "
                   "(results/stream_prune_phases.md)")
    args = p.parse_args()
    if args.worker:
        name, *rest = args.worker
        result = {"make": worker_make, "prune": worker_prune, "compare": worker_compare,
                  "phases": worker_phases}[name](*rest)
        print(json.dumps(result))
        return
    work = Path(args.work)
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").is_file():
        _run("make", str(ckpt))
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    if args.phases:
        import shutil

        shutil.rmtree(work / "phases", ignore_errors=True)
        r = _run("phases", str(ckpt), str(work / "phases"))
        from transformers import LlamaConfig

        from minitron.streaming import expected_peak_bytes

        e = expected_peak_bytes(LlamaConfig(**{k: v for k, v in SHAPE.items() if k != "dtype"}), SAMPLES, SEQ, BATCH,
                                weight_bytes=2, act_bytes=2)
        text = f"""# Streamed prune of the {size / 2**30:.2f} GiB checkpoint, phase by phase (CPU, {r['threads']} threads)

Written by `benchmarks/stream_prune.py --phases` (same checkpoint, target and blocks as `stream_prune.md`,
depth `bi`). VmHWM reset between the phases; MiB above the RSS after the imports.

{md_table(["phase", "measured peak MiB", "formula MiB (expected_peak_bytes)"], [
    ["calibration (one layer at a time)", f"{r['calibration_mb']:.0f}", f"{e['calibration'] / 2**20:.0f}"],
    ["RSS left after calibration", f"{r['after_calibration_mb']:.0f}", "-"],
    ["surgery + writing (16 MiB row chunks)", f"{r['write_mb']:.0f}",
     f"{e['write_pass'] / 2**20:.0f} + what calibration left"]])}

The formula leaves out what calibration leaves resident after its last layer (the second row); it was
not broken down further (candidates: libraries and allocator caches touched by the first forward, heap
fragments). The measured calibration peak exceeds the formula by about that amount.
"""
        write_result(RESULTS / "stream_prune_phases.md", text)
        print(text)
        return
    results, cmp = {}, {}
    for depth in ("bi", "ppl"):
        for mode in ("in-memory", "streamed"):
            out = work / f"{mode}-{depth}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            results[f"{mode}, depth {depth}"] = _run("prune", str(ckpt), str(out), mode, depth)
        cmp[depth] = _run("compare", str(work / f"in-memory-{depth}"), str(work / f"streamed-{depth}"))
    rows = [[mode, f"{r['import_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['peak_mb'] * 2**20 / size:.3f}x",
             f"{r['seconds']:.0f}", "-" if r["bytes_read"] is None else f"{r['bytes_read'] / size:.2f}x"]
            for mode, r in results.items()]
    equal = "\n".join(f"- depth `{d}`: every tensor equal **{c['tensors_equal']}**, logits equal **{c['logits_equal']}** "
                      f"(max abs diff {c['max_abs_diff']}, dtype {c['dtype']})" for d, c in cmp.items())
    text = f"""# Streamed vs in-memory prune of a {size / 2**30:.2f} GiB bf16 checkpoint (CPU, 2 shared cores)

Written by `benchmarks/stream_prune.py`. Llama shape {SHAPE} (random weights, written shard by shard), target
{TARGET}, calibration {SAMPLES} blocks x {SEQ} token ids, batch {BATCH}; depth ranked by Block Importance (`bi`) or by
the layer-drop loss (`ppl`, all {SAMPLES} blocks; streamed, it carries every layer-dropped variant's hidden states
and reads the lm_head whole: `minitron.streaming.depth.layer_drop_bytes`).
Peak = VmHWM of a fresh worker process minus its RSS after the imports, over the checkpoint's bytes. Times are
on a shared, loaded machine (4 other jobs): indicative only.

{md_table(["run", "RSS after imports MiB", "peak above imports MiB", "peak / checkpoint", "s", "bytes read / checkpoint"], rows)}

Streamed vs in-memory output, both reloaded with stock `from_pretrained`:

{equal}

## Expected peak of the streamed prune (`minitron.streaming.expected_peak_bytes`, bf16 weights and activations)

Calibration: one decoder layer's weights + the cached hidden states of every calibration block (+ rotary
tables) + one batch's working set inside a layer (q/k/v/o, gate/up/act activations, fp32 attention scores of
one batch of {BATCH} x {SEQ} tokens) + the file pages of the largest weight while it is read. The write pass
holds about four 16 MiB row chunks (64 MiB). Expected peak = the larger of the two (above the imports). The
checkpoint column counts the layers, embeddings and an untied head.

{md_table(["model", "calibration", "checkpoint GiB", "layer GiB", "cached hidden GiB", "batch working set GiB", "read pages GiB", "write pass GiB", "expected peak GiB", "peak / checkpoint"], expected_rows())}
"""
    path = write_result(RESULTS / "stream_prune.md", text)
    (RESULTS / "stream_prune.json").write_text(json.dumps({"checkpoint_bytes": size, "runs": results,
                                                          "compare": cmp}, indent=2) + "\n")
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
