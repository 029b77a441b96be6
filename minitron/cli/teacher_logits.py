"""``minitron teacher-logits``: cache a teacher's top-k logits for offline distillation.

Runs the teacher once over the training data and writes, per token, its top-k logits and ids and the
log-sum-exp of its full distribution (safetensors shards + ``manifest.json``; see
:func:`minitron.cache_teacher_logits`). ``minitron distill --teacher-cache CACHE --student S --data D``
then trains with no teacher in memory; a cache of other data, tokenizer, top-k or temperature is refused.

Example:
    minitron teacher-logits --teacher llama/ --data train.jsonl --top-k 64 --seq-len 1024 --out cache/
    minitron distill --student pruned/ --teacher-cache cache/ --data train.jsonl --seq-len 1024 --top-k 64
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_model_arguments, positive_int


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``teacher-logits`` subcommand to an argparse ``subparsers`` object.

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.
    Returns:
        The new sub-parser (its ``func`` default is :func:`run`).
    Example:
        >>> register(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser("teacher-logits", help="cache a teacher's top-k logits for offline distillation",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, None, "--teacher", "teacher (required)")
    p.add_argument("--data", required=True, help="training data, as for minitron distill (.txt / .jsonl / .pt)")
    p.add_argument("--top-k", type=positive_int, required=True, help="logits kept per token")
    p.add_argument("--output-dir", "--out", dest="output_dir", required=True, help="new or empty cache directory "
                   "(--out: deprecated alias)")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per block (default: the rows of a "
                   "2-D token-id .pt file, else 1024 or the teacher's max_position_embeddings if smaller); use the "
                   "same value for minitron distill")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1.0)")
    p.add_argument("--vocab-size", type=positive_int, default=None, help="rank only the first N lm_head rows "
                   "(the student's vocabulary when the teacher's has padding rows)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the teacher's)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="blocks per teacher forward (default 8)")
    p.add_argument("--chat-template", action="store_true", help="render text with the tokenizer's chat template")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Load the teacher and write the cache; prints its size. Returns exit status 0 (errors raise)."""
    import json
    import time

    from ..distillation.teacher_cache import MANIFEST, cache_teacher_logits
    from ..models import input_paths, load_model, load_tokenizer
    from ..outputs import check_output_dir

    if args.teacher is None:
        raise ValueError("--teacher is required: the model whose logits are cached")
    started = time.time()
    inputs = input_paths(args.teacher, args.teacher_gguf, args.data) + input_paths(args.tokenizer, None)
    check_output_dir(args.output_dir, "teacher-logits", inputs=inputs, overwrite=False, flag="--output-dir")
    teacher, tokenizer = load_model(args.teacher, gguf_file=args.teacher_gguf)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    out = cache_teacher_logits(teacher, args.data, args.output_dir, top_k=args.top_k, tokenizer=tokenizer,
                               seq_len=args.seq_len, temperature=args.temperature, vocab_size=args.vocab_size,
                               batch_size=args.batch_size, chat_template=args.chat_template)
    man = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    n_tok = man["data"]["n_blocks"] * man["data"]["seq_len"]
    print(json.dumps({"cache": str(out), "blocks": man["data"]["n_blocks"], "seq_len": man["data"]["seq_len"],
                      "top_k": man["top_k"], "tokens": n_tok, "bytes_per_token": man["bytes_per_token"],
                      "seconds": round(time.time() - started, 1)}))
    return 0
