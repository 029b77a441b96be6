"""``minitron prune``: load a model, calibrate, prune to a target or a parameter budget, report, save.

With no arguments it prunes SmolLM2-135M-Instruct to half its parameters on the built-in text
(``--model builtin-tiny``: the 7M built-in model, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import BUILTIN, add_model_arguments, default_device, input_paths, positive_int, text_source

DENSE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads")
MOE_FIELDS = ("num_experts", "expert_intermediate_size", "shared_expert_intermediate_size")

def _add_prune_arguments(p: argparse.ArgumentParser) -> None:
    from ..importance.aggregate import BATCH_AGGREGATIONS, SEQ_AGGREGATIONS
    from ..importance.heads import HEAD_METRICS
    from ..models import DEFAULT_MODEL
    from ..pruning import DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC, DEFAULT_HEAD_RESIDUAL, DEFAULT_NORM_RESCALE

    add_model_arguments(p, DEFAULT_MODEL)
    p.add_argument("--data", "--calib", dest="data", default=BUILTIN, help=".txt/.jsonl calibration text (default: "
                   "built-in corpus; --calib: deprecated alias)")
    p.add_argument("--eval-data", "--eval", dest="eval_data", default=None, help=".txt/.jsonl text for perplexity "
                   "before/after (default: the built-in held-out split when --model is a built-in model; --eval: "
                   "deprecated alias)")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out blocks of --seq-len tokens for the "
                   "perplexity before/after (default 16; 0 = all)")
    p.add_argument("--chat-template", action="store_true", help="render calibration/eval text with the "
                   "tokenizer's chat template (chat / instruct models; 'messages' records always are)")
    p.add_argument("--output-dir", "--out", dest="output_dir", default="out/minitron-pruned", help="output directory "
                   "of the pruned checkpoint (a new or empty directory, or a previous `minitron prune` output, which is "
                   "replaced; --out: deprecated alias)")
    p.add_argument("--overwrite", action="store_true", help="allow --output-dir / --save-scores to be an existing directory "
                   "or file not written by minitron: minitron's files replace same-named ones, nothing else is deleted")
    g = p.add_argument_group("target (any subset; or --params); each flag is the minitron.Target field of that name, "
                             "the short flags are deprecated aliases")
    g.add_argument("--hidden-size", type=int, help="embedding channels to keep")
    g.add_argument("--intermediate-size", "--ffn", dest="intermediate_size", type=int, help="MLP neurons to keep "
                   "(Mixtral: the experts' FFN, as --expert-intermediate-size; Qwen-MoE: the dense MLP layers')")
    g.add_argument("--num-attention-heads", "--heads", dest="num_attention_heads", type=int,
                   help="query heads to keep (multiple of the KV heads)")
    g.add_argument("--num-hidden-layers", "--layers", dest="num_hidden_layers", type=int, help="decoder layers to keep")
    g.add_argument("--num-key-value-heads", "--kv-heads", dest="num_key_value_heads", type=int, help="KV groups to "
                   "keep (explicit opt-in: the Minitron recipe keeps every K/V head; needs --num-attention-heads)")
    g.add_argument("--num-experts", "--experts", dest="num_experts", type=int, help="mixture of experts: experts to "
                   "keep in every sparse layer (ranked per layer by router-weighted output norm; at least "
                   "num_experts_per_tok)")
    g.add_argument("--expert-intermediate-size", "--expert-ffn", dest="expert_intermediate_size", type=int,
                   help="mixture of experts: FFN neurons every kept expert keeps (each expert its own most important "
                   "ones)")
    g.add_argument("--shared-expert-intermediate-size", "--shared-expert-ffn", dest="shared_expert_intermediate_size",
                   type=int, help="Qwen2-MoE: FFN neurons of the shared expert to keep")
    g.add_argument("--params", type=float, help="parameter budget: a fraction in (0, 1] or an absolute count "
                   "(values > 1 are counts; width first; default 0.5 when no target is given)")
    i = p.add_argument_group("importance")
    i.add_argument("--depth-metric", choices=("ppl", "bi"), default=DEFAULT_DEPTH_METRIC,
                   help="ppl: LM loss with the layer dropped; bi: Block Importance (the paper's)")
    i.add_argument("--head-metric", choices=HEAD_METRICS, default=DEFAULT_HEAD_METRIC,
                   help="output: each head's contribution after o_proj; input: the paper's o_proj-input "
                   "criterion; loss: LM loss with the head dropped")
    i.add_argument("--norm-rescale", action=argparse.BooleanOptionalAction, default=DEFAULT_NORM_RESCALE,
                   help="after hidden pruning, scale the RMSNorm weights by the calibrated kept/full RMS ratio")
    i.add_argument("--head-residual", action=argparse.BooleanOptionalAction, default=DEFAULT_HEAD_RESIDUAL,
                   help="fold dropped heads' o_proj columns into the kept heads of their KV group (the paper's "
                   "head residual)")
    i.add_argument("--depth-mode", choices=("scattered", "contiguous"), default="scattered")
    i.add_argument("--depth-rounds", type=positive_int, default=1, help="with --depth-metric ppl: remove layers over "
                   "this many rounds, re-scoring between rounds (costs ~N x the one-shot passes; default 1)")
    i.add_argument("--batch-agg", choices=BATCH_AGGREGATIONS, default="l2")
    i.add_argument("--seq-agg", choices=SEQ_AGGREGATIONS, default="mean")
    i.add_argument("--method", choices=("activation", "random"), default="activation")
    i.add_argument("--num-samples", type=positive_int, default=64, help="calibration blocks of --seq-len tokens "
                   "(default 64 = 16k tokens, about a minute for 135M parameters on 2 CPU cores; the official "
                   "recipe and the Python API (PruneConfig.num_samples) use 1024)")
    i.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per calibration / held-out block (default: the rows of a 2-D token-id .pt file, "
                   "else 256, or the model's max_position_embeddings if smaller)")
    i.add_argument("--batch-size", type=positive_int, default=8, help="calibration blocks per forward pass")
    i.add_argument("--save-scores", help="write importance statistics here (safetensors)")
    i.add_argument("--load-scores", help="reuse importance statistics instead of calibrating")
    p.add_argument("--device", default=default_device())
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="dtype the model is loaded in (default float32; with --stream: the calibration dtype, "
                   "default the checkpoint's)")
    p.add_argument("--inplace", action="store_true", help="compact weights in place (peak memory ~1x model)")
    p.add_argument("--stream", action="store_true", help="prune the checkpoint folder --model without loading it: "
                   "one decoder layer in memory during calibration, one row chunk during the surgery (peak ~ one "
                   "layer + the calibration hidden states; weights keep their stored dtype, --dtype is the "
                   "calibration dtype); --head-metric loss falls back to output, --params to a scaled shape, "
                   "--depth-metric ppl to bi when its layer-dropped variants exceed 4 GiB. Chosen automatically "
                   "(said on stderr) when a dense checkpoint folder would not fit in the available memory")
    p.add_argument("--no-progress", action="store_true")


TARGET_FLAGS = {  # minitron.Target field -> its flag (the deprecated short alias in parentheses)
    "hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size (--ffn)",
    "num_attention_heads": "--num-attention-heads (--heads)", "num_hidden_layers": "--num-hidden-layers (--layers)",
    "num_key_value_heads": "--num-key-value-heads (--kv-heads)", "num_experts": "--num-experts (--experts)",
    "expert_intermediate_size": "--expert-intermediate-size (--expert-ffn)",
    "shared_expert_intermediate_size": "--shared-expert-intermediate-size (--shared-expert-ffn)",
}


def prune_config(args: argparse.Namespace) -> Any:
    """The :class:`minitron.PruneConfig` the ``minitron prune`` flags describe (validated on construction).

    Args:
        args: the parsed ``minitron prune`` arguments.
    Returns:
        A ``PruneConfig``.
    Example:
        >>> prune_config(build_parser().parse_args(["prune", "--depth-metric", "bi"])).depth_metric
        'bi'
    """
    import minitron

    try:
        return minitron.PruneConfig(
            importance=minitron.ImportanceConfig(seq_agg=args.seq_agg, batch_agg=args.batch_agg,
                                                 batch_size=args.batch_size),
            num_samples=args.num_samples, seq_len=args.seq_len, chat_template=args.chat_template,
            depth_metric=args.depth_metric, depth_mode=args.depth_mode, depth_rounds=args.depth_rounds,
            head_metric=args.head_metric, norm_rescale=args.norm_rescale, head_residual=args.head_residual,
            method=args.method)
    except ValueError as e:  # the library names its fields; the command line names its flags
        if str(e).startswith("depth_rounds="):
            raise ValueError(f"--depth-rounds={args.depth_rounds} needs --depth-metric ppl and --depth-mode "
                             "scattered (iterative removal re-scores by layer-drop loss)") from None
        raise


def run_prune(args: argparse.Namespace) -> int:
    """Execute ``minitron prune``: parse the flags into a ``Target``/``PruneConfig``, call :func:`minitron.prune`
    (or :func:`minitron.prune_checkpoint` with ``--stream``), print the report and write ``args.output_dir``."""
    import minitron
    from ..adapters import moe_sizes, moe_spec_of
    from ..models import is_builtin_model, load_model
    from ..outputs import check_output_dir, check_output_file, write_output_dir
    from ..pruner import check_prune_request, pruning_summary
    from ..pruning.target import model_sizes
    from ..importance.collect import is_importance_file
    from ..validate import check_device

    started = time.time()
    fields = {name: getattr(args, name) for name in TARGET_FLAGS}
    target = minitron.Target(**fields) if any(v is not None for v in fields.values()) else None
    if target is not None and args.params is not None:
        raise ValueError("--params cannot be combined with " + "/".join(f.split()[0] for f in TARGET_FLAGS.values())
                         + "; give either a parameter budget or explicit targets")
    params = args.params if args.params is not None or target is not None else 0.5
    config = prune_config(args)  # every option checked before any loading
    check_device(args.device)
    if not args.stream:
        reason = _does_not_fit(args)
        if reason:
            print(f"minitron: {reason}: pruning the checkpoint layer by layer instead (--stream)", file=sys.stderr)
            args.stream = True
    if args.stream:
        return _run_stream(args, target, params, config, started)
    inputs = input_paths(args.model, args.model_gguf, args.data, args.eval_data, args.load_scores)
    check_output_dir(args.output_dir, "prune", inputs=inputs, overwrite=args.overwrite, flag="--output-dir")  # first
    if args.save_scores:
        check_output_file(args.save_scores, inputs=inputs, outside_of=[("--output-dir", args.output_dir)],
                          overwrite=args.overwrite, is_ours=is_importance_file)
    scores = minitron.ImportanceScores.load(args.load_scores) if args.load_scores else None
    model, tokenizer = load_model(args.model, gguf_file=args.model_gguf, device=args.device,
                                  dtype=args.dtype or "float32")
    if target is None and moe_spec_of(model.config) is not None:  # the library's refusal, in the command's words
        raise ValueError(f"--params{'' if args.params is not None else ' (the default when no target is given)'}: "
                         "parameter budgets choose hidden/FFN shapes of dense models; for the mixture-of-experts "
                         f"{type(model).__name__} give explicit targets (--num-experts, --expert-intermediate-size"
                         f"{', --shared-expert-intermediate-size' if moe_sizes(model.config)['shared_expert_intermediate_size'] else ''}"
                         ", --hidden-size, --num-attention-heads, --num-hidden-layers) or rank candidates with "
                         "`minitron search`")
    # the checks of minitron.prune that need no data, before the perplexity pass below
    check_prune_request(model, target, None if target is not None else params, config, scores)

    eval_blocks = None
    eval_source = (text_source(BUILTIN, "valid") if args.eval_data is None and is_builtin_model(args.model, args.model_gguf)
                   else args.eval_data)
    if eval_source is not None:
        eval_blocks = _text_blocks(args, eval_source, tokenizer, args.eval_samples or None, "--eval-data", model)
        before_ppl = minitron.perplexity(model, eval_blocks, args.batch_size)
    before_params = minitron.count_parameters(model)
    calib = text_source(args.data) if args.method == "activation" else None
    try:
        pruned = minitron.prune(model, calib, target=target, params=params if target is None else None, config=config,
                                tokenizer=tokenizer, scores=scores, save_scores=args.save_scores, inplace=args.inplace,
                                progress=not args.no_progress, verbose=False)
    except ValueError as e:
        raise _in_flag_words(e, args, tokenizer, "--data") from None
    if args.save_scores and scores is None and args.method == "activation":
        print(f"importance statistics written to {args.save_scores}")
    print(pruning_summary(before_params, pruned))

    def write(tmp: Path) -> None:
        pruned.save_pretrained(tmp)
        if tokenizer is not None:  # a checkpoint folder without tokenizer files, calibrated on token ids
            tokenizer.save_pretrained(tmp)

    write_output_dir(args.output_dir, "prune", write, overwrite=args.overwrite)
    if tokenizer is None:
        print(f"note: {args.model} has no tokenizer, so {args.output_dir} holds none (token-id calibration needs "
              "none); copy the original tokenizer files into it to use it on text")
    sizes = model_sizes(pruned.config)  # mixture-of-experts sizes under minitron's names, only when present
    config_report = {k: getattr(pruned.config, k) for k in (*DENSE_FIELDS, "head_dim")}
    config_report.update({k: sizes[k] for k in MOE_FIELDS if sizes[k] is not None})
    if sizes["num_experts"] is not None:
        config_report["num_experts_per_tok"] = pruned.config.num_experts_per_tok
    report = {"model": str(args.model), "out": str(args.output_dir), "params_before": before_params,
              "params_after": minitron.count_parameters(pruned), "config": config_report,
              "inplace": pruned is model, "dtype": str(next(pruned.parameters()).dtype).removeprefix("torch.")}
    if eval_blocks is not None:
        report["ppl_before"] = round(before_ppl, 3)
        report["ppl_after"] = round(minitron.perplexity(pruned, eval_blocks, args.batch_size), 3)
        print(f"held-out perplexity: {report['ppl_before']:.2f} -> {report['ppl_after']:.2f} "
              "(before retraining; `minitron distill` recovers it)")
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps(report))
    print(f"pruned checkpoint written to {args.output_dir} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def _text_blocks(args: argparse.Namespace, source: Any, tokenizer: Any, n: int | None, flag: str, model: Any) -> Any:
    """``source`` as token blocks of ``--seq-len`` (the held-out text of the before/after perplexity)."""
    from ..data import load_text_blocks, resolve_seq_len

    try:
        seq_len = resolve_seq_len(text_source(args.data), args.seq_len, [model], flag="--seq-len")
        return load_text_blocks(source, tokenizer, seq_len, n, chat_template=args.chat_template)
    except ValueError as e:
        raise _in_flag_words(e, args, tokenizer, flag) from None


def _in_flag_words(err: ValueError, args: argparse.Namespace, tokenizer: Any, flag: str) -> ValueError:
    """The library's message about ``tokenizer=`` / ``seq_len=``, reworded with the command's flags."""
    text = str(err)
    if tokenizer is None and text.startswith("text data needs a tokenizer"):
        return ValueError(f"{flag} is text and --model {args.model} has no tokenizer files; pass token ids "
                          f"({flag} ids.pt) or a checkpoint folder that holds its tokenizer")
    if text.startswith("seq_len="):
        return ValueError("--seq-len" + text[len("seq_len"):].replace("lower seq_len", "lower --seq-len"))
    return err


def _available_bytes(device: str) -> int | None:
    """Memory the model could be loaded into: ``MemAvailable`` (CPU, Linux) or the GPU's free bytes."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _does_not_fit(args: argparse.Namespace) -> str | None:
    """Why ``--model`` would not fit in memory when loaded (then the prune streams), or None.

    Only for a dense safetensors checkpoint folder the streamed path takes, with no flag that needs the
    whole model (``--inplace``, ``--eval``, ``--depth-rounds``): its tensors' count times the load dtype's
    bytes, against the available memory.
    """
    import torch

    from ..adapters import adapter_for_config
    from ..models import resolve_model_source
    from ..streaming.checkpoint import CheckpointReader

    if args.inplace or args.eval_data is not None or args.depth_rounds > 1:
        return None
    try:
        kind, path = resolve_model_source(args.model, args.model_gguf)
        if kind == "gguf":
            return None
        reader = CheckpointReader(path)
        from transformers import AutoConfig

        from ..local import from_pretrained

        adapter = adapter_for_config(from_pretrained(AutoConfig, path, "--model"))
    except Exception:  # noqa: BLE001 - unreadable / corrupt / unsupported: the in-memory path names the problem
        return None
    if adapter is None or adapter.moe is not None:
        return None
    need = sum(reader.nbytes(n) // reader.dtype(n).itemsize for n in reader.names()) \
        * getattr(torch, args.dtype or "float32").itemsize
    available = _available_bytes(args.device)
    if available is None or need <= 0.9 * available:
        return None
    size = lambda n: f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"  # noqa: E731
    return f"--model {args.model} needs ~{size(need)} in {args.dtype or 'float32'} but {size(available)} are available"


def _run_stream(args: argparse.Namespace, target: Any, params: float | None, config: Any, started: float) -> int:
    """``minitron prune --stream``: :func:`minitron.prune_checkpoint` on the checkpoint folder ``--model``."""
    import minitron
    from ..models import resolve_model_source
    from ..pruning.params import count_parameters
    from ..streaming.checkpoint import CheckpointReader, skeleton

    clashes = [flag for flag, on in (("--inplace", args.inplace), ("--eval-data", args.eval_data is not None),
                                     ("--depth-rounds", args.depth_rounds > 1)) if on]
    if clashes:
        raise ValueError(f"--stream cannot be combined with {', '.join(clashes)} (each needs the whole model in "
                         "memory); drop it, and evaluate the pruned checkpoint afterwards")
    kind, path = resolve_model_source(args.model, args.model_gguf)
    if kind == "gguf":
        raise ValueError(f"--stream reads a safetensors checkpoint folder, but --model {args.model} is a GGUF file; "
                         "convert it first (minitron prune without --stream loads GGUF files)")
    scores = minitron.ImportanceScores.load(args.load_scores) if args.load_scores else None
    out = minitron.prune_checkpoint(
        path, args.output_dir, text_source(args.data) if config.method == "activation" else None, target,
        params=params if target is None else None, scores=scores, importance=config.importance,
        seq_len=config.seq_len, num_samples=config.num_samples, depth_metric=config.depth_metric,
        depth_mode=config.depth_mode, head_metric=config.head_metric, norm_rescale=config.norm_rescale,
        head_residual=config.head_residual, method=config.method, dtype=args.dtype, device=args.device,
        save_scores=args.save_scores, chat_template=config.chat_template, overwrite=args.overwrite,
        progress=not args.no_progress)
    before = skeleton(path, None, CheckpointReader(path))
    after = skeleton(out, None, CheckpointReader(out))
    report = {"model": str(args.model), "out": str(out), "streamed": True,
              "params_before": count_parameters(before), "params_after": count_parameters(after),
              "config": {k: getattr(after.config, k) for k in (*DENSE_FIELDS, "head_dim")},
              "seconds": round(time.time() - started, 1)}
    print(json.dumps(report))
    print(f"pruned checkpoint written to {out} (streamed; loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``prune`` subcommand to an argparse ``subparsers`` object.

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.
    Returns:
        The new sub-parser (its ``func`` default is :func:`run_prune`).
    Example:
        >>> register(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser("prune", help="prune a causal LM (default: SmolLM2-135M-Instruct to 50%% of its "
                              "parameters)")
    _add_prune_arguments(p)
    p.set_defaults(func=run_prune)
    return p
