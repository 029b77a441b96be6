"""The library's input checks; each raises a one-line ValueError naming the problem and the fix.

Counts, devices, sequence length vs the model's positions, finiteness of weights and importance
statistics, and token ids vs the vocabulary. (The command line's argparse types live in
:mod:`minitron.cli.common`; whether a file is an importance file, in :mod:`minitron.importance.collect`.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def check_count(name: str, value: Any, low: int = 1, allow_none: bool = False) -> None:
    """Raise unless ``value`` is an integer (not a bool or a float) >= ``low`` (or None if allowed).

    Args:
        name: the argument's name, used in the message.
        value: the value to check.
        low: smallest allowed value.
        allow_none: whether None is allowed.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {low}{none}, got {value!r}")


def check_device(device: str, flag: str = "--device") -> None:
    """Raise if ``device`` is not a torch device this machine has (e.g. ``cuda`` without a GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {device!r} is not a torch device; use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA GPU is available to torch on this machine; use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s); use an index below that")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{flag} {device!r} is not supported; use cpu or cuda")


def check_seq_len(model: nn.Module, seq_len: int, flag: str = "seq_len") -> None:
    """Raise if ``seq_len`` exceeds the model's ``max_position_embeddings`` (positions it never saw)."""
    mpe = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if mpe is not None and seq_len > mpe:
        raise ValueError(f"{flag}={seq_len} exceeds the model's max_position_embeddings={mpe}; lower {flag} to at "
                         f"most {mpe}")


def _all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` over 1M-element slices: isfinite builds an ``abs()`` copy and bool
    masks of its input, which for a whole embedding would be ~1.3x that weight's bytes at once; a
    memory-mapped weight's file pages are dropped behind the scan (:func:`minitron.heap.released_chunks`)."""
    from .heap import released_chunks

    return all(bool(torch.isfinite(part).all()) for part in released_chunks(t))


def check_finite_weights(model: nn.Module, what: str = "model") -> None:
    """Raise if any parameter or buffer of ``model`` holds NaN or inf (a corrupt or overflowed checkpoint).

    Module by module; accelerate-offloaded modules are materialised one at a time (:mod:`minitron.offload`).
    """
    from .offload import onloaded

    # the names to check, each tied weight once: taken from the registered (persistent) tensors, since an
    # offloaded module's onloaded copies are freed after each module and a later copy may reuse their id()
    pending = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}

    def own(prefix: str, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        tensors = (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        return [(f"{prefix}.{name}" if prefix else name, t) for name, t in tensors]

    for prefix, module in model.named_modules():
        if not any(full in pending for full, _ in own(prefix, module)):
            continue
        with onloaded(module):  # an accelerate-offloaded module's weights are read from its offload store
            for full, t in own(prefix, module):
                if full not in pending:
                    continue
                pending.discard(full)
                if t.is_floating_point() and not _all_finite(t.detach()):
                    raise ValueError(f"the {what}'s weight {full} holds NaN/inf values; the checkpoint is corrupt or "
                                     "overflowed (reload it, or load it in float32)")


def check_finite_scores(scores: Any, source: str = "importance statistics") -> None:
    """Raise if importance statistics hold NaN/inf (activations overflowed during calibration)."""
    tensors = [(f"{site}.{part}", t) for site, pair in scores.sums.items() for part, t in zip(("sum_x", "sum_x2"), pair)]
    tensors.append(("bi_cos_sum", scores.bi_cos_sum))
    if scores.ppl_loss is not None:
        tensors.append(("ppl_loss", scores.ppl_loss))
    for name, t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source} hold NaN/inf at {name}: the activations overflowed; calibrate in float32 "
                             "(--dtype float32) or check the model's weights")
    if scores.base_loss is not None and not math.isfinite(scores.base_loss):
        raise ValueError(f"{source} hold a non-finite base loss; calibrate in float32 (--dtype float32)")


def check_token_ids(model: nn.Module, blocks: torch.Tensor, what: str = "data") -> None:
    """Raise if ``blocks`` hold token ids outside the model's embedding table.

    Args:
        model: a causal LM with input embeddings.
        blocks: LongTensor of token ids.
        what: how the data is named in the message.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or blocks.numel() == 0:
        return
    vocab = int(emb.weight.shape[0])
    lo, hi = int(blocks.min()), int(blocks.max())
    if lo < 0 or hi >= vocab:
        bad = hi if hi >= vocab else lo
        raise ValueError(f"{what} holds token id {bad} but the model's vocabulary has {vocab} entries (ids 0..{vocab - 1});"
                         " tokenise it with the model's own tokenizer")
