"""Benchmark: overhead of importance collection hooks relative to a plain forward pass.

A tiny Llama built from a config (no download) runs forward passes with and without hooks.
Hooks follow docs/method.md section 1: the input of every ``mlp.down_proj`` and ``self_attn.o_proj``
and the output of every decoder-block norm feed an ``accumulate_`` update (seq=mean), and
each decoder layer feeds ``block_importance_update_`` (cosine of its input and output).
``--impl`` picks the accumulation path (``reference`` on CPU; ``triton`` needs CUDA or
TRITON_INTERPRET=1, which is far too slow to time).

Usage:
    python benchmarks/bench_importance.py                      # CPU, reference path
    python benchmarks/bench_importance.py --device cuda --impl triton --hidden 2048 --layers 8 --seq 2048
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minitron.importance.aggregate import accumulate_, block_importance_update_


def add_hooks(model: torch.nn.Module, impl: str) -> tuple[list, dict]:
    """Register importance hooks; returns (handles, accumulators)."""
    dev = next(model.parameters()).device
    acc: dict[str, list[torch.Tensor]] = {}
    handles = []

    def site(name: str, dim: int) -> list[torch.Tensor]:
        acc[name] = [torch.zeros(dim, device=dev), torch.zeros(dim, device=dev)]
        return acc[name]

    for i, layer in enumerate(model.model.layers):
        for name, mod, use_input in (
            (f"{i}.down_proj", layer.mlp.down_proj, True),
            (f"{i}.o_proj", layer.self_attn.o_proj, True),
            (f"{i}.input_layernorm", layer.input_layernorm, False),
            (f"{i}.post_attention_layernorm", layer.post_attention_layernorm, False),
        ):
            dim = mod.in_features if use_input else mod.weight.shape[0]
            sums = site(name, dim)

            def hook(m, args, out, sums=sums, use_input=use_input):
                accumulate_(sums[0], sums[1], (args[0] if use_input else out).detach(), "mean", impl=impl)

            handles.append(mod.register_forward_hook(hook))
        bi = acc.setdefault(f"{i}.bi", [torch.zeros(1, device=dev)])

        def bi_hook(m, args, kwargs, out, bi=bi):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            block_importance_update_(bi[0], h_in.detach(), h_out.detach(), impl=impl)

        handles.append(layer.register_forward_hook(bi_hook, with_kwargs=True))
    return handles, acc


def timed(model, ids, iters: int, device: str) -> float:
    with torch.no_grad():
        model(ids)  # warmup
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(ids)
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--impl", default=None, help="accumulate_ impl; default: auto")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 cpu, bf16 cuda)")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    impl = args.impl or "auto"
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 256, 1), max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(args.device, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    plain = timed(model, ids, args.iters, args.device)
    handles, acc = add_hooks(model, impl)
    path = accumulate_(torch.zeros(4, device=args.device), torch.zeros(4, device=args.device),
                       torch.zeros(1, 1, 4, device=args.device, dtype=dtype), impl=impl)
    hooked = timed(model, ids, args.iters, args.device)
    for h in handles:
        h.remove()
    dead = [k for k, v in acc.items() if not bool(v[0].abs().sum() > 0)]
    assert not dead, f"hooks never fired for {dead}"
    table = (
        "| device | dtype | path | hidden | layers | B x S | plain fwd ms | hooked fwd ms | overhead |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        f"| {args.device} | {str(dtype).split('.')[-1]} | {path} | {args.hidden} | {args.layers} | "
        f"{args.batch} x {args.seq} | {plain:.1f} | {hooked:.1f} | {100 * (hooked / plain - 1):+.1f}% |"
    )
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# Importance hook overhead ({args.device})\n\n4 activation sites + 1 block-importance "
                    f"site per layer ({len(acc)} accumulators), seq_agg=mean, {args.iters} timed forwards "
                    "after one warmup, torch.no_grad.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
