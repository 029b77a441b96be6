"""Training/eval data for distillation: packed token blocks and a deterministic batch order.

Loading and packing is the shared loader :func:`minitron.data.load_text_blocks` (texts, chats,
token ids, ``.txt``/``.jsonl``/``.pt`` files); this module adds an early empty-data check.
The batch order is a pure function of ``(seed, step)``, so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from minitron.data import is_token_file, load_text_blocks, load_token_file


def check_nonempty(data: Any) -> None:
    """Raise ValueError for obviously empty data (empty list/tensor/dataset) or a float tensor."""
    if isinstance(data, (list, tuple)) and len(data) == 0:
        raise ValueError("empty data: the list of texts is empty; pass at least seq_len tokens of text")
    if isinstance(data, torch.Tensor):
        if data.numel() == 0:
            raise ValueError("empty data: the token-id tensor has no elements")
        if data.dtype.is_floating_point or data.dtype == torch.bool:
            raise ValueError(f"token-id tensor must be an integer tensor, got dtype {data.dtype}")
    if getattr(data, "column_names", None) is not None and len(data) == 0:
        raise ValueError("empty data: the dataset has no rows")


def load_blocks(data: Any, tokenizer: Any, seq_len: int, max_blocks: int | None = None, *,
                chat_template: bool = False) -> torch.Tensor:
    """Turn any supported data kind into packed blocks of token ids.

    Args:
        data: a ``datasets.Dataset`` (``text`` or ``input_ids`` column), a list of strings, a path to
            a ``.txt``/``.jsonl`` file (or a ``.pt`` file holding a LongTensor), or a LongTensor of
            token ids (1-D stream or 2-D ``(n, seq_len)`` blocks).
        tokenizer: Hugging Face tokenizer (not needed for token ids).
        seq_len: tokens per block.
        max_blocks: keep at most this many blocks.
        chat_template: render plain-text documents with the tokenizer's chat template.
    Returns:
        LongTensor (n_blocks, seq_len).
    Raises:
        ValueError: empty data or fewer than ``seq_len`` tokens.
    Example:
        >>> load_blocks(torch.arange(100), None, seq_len=10).shape
        torch.Size([10, 10])
    """
    if is_token_file(data):
        data = load_token_file(data)
    check_nonempty(data)
    return load_text_blocks(data, tokenizer, seq_len, max_blocks=max_blocks, chat_template=chat_template).contiguous()


def batch_indices(n_blocks: int, seed: int, step: int, micro: int, batch_size: int, grad_accum: int) -> torch.Tensor:
    """Block indices of one global micro-batch, a pure function of ``(seed, step, micro)``.

    Sample ``k = (step * grad_accum + micro) * batch_size + j`` of the run is block
    ``perm_e[k % n_blocks]`` with ``e = k // n_blocks`` the epoch and ``perm_e`` a
    permutation seeded by ``(seed, e)``: every epoch visits each block once.

    Args:
        n_blocks: number of training blocks.
        seed: run seed.
        step: optimizer step (0-based).
        micro: micro-step within the optimizer step (0 <= micro < grad_accum).
        batch_size: global micro-batch size.
        grad_accum: micro-steps per optimizer step.
    Returns:
        LongTensor (batch_size,) of block indices.
    """
    start = (step * grad_accum + micro) * batch_size
    ks = torch.arange(start, start + batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in torch.unique(ks // n_blocks).tolist():
        sel = (ks // n_blocks) == epoch
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(n_blocks, generator=g)
        out[sel] = perm[ks[sel] % n_blocks]
    return out


def _needs_tokenizer(data: Any) -> bool:
    if isinstance(data, torch.Tensor) or (isinstance(data, (str, os.PathLike)) and str(data).lower().endswith(".pt")):
        return False
    if isinstance(data, (list, tuple)) and data and not any(isinstance(d, str) for d in data):
        return False  # token-id lists
    cols = getattr(data, "column_names", None)
    return not (cols is not None and "input_ids" in cols)


def resolve_tokenizer(student: Any, tokenizer: Any, datas: Sequence[Any]) -> Any:
    """``tokenizer``, else the student's own (loaded from its local path) when some data is text.

    Args:
        student: the student model (its local path holds the tokenizer).
        tokenizer: the user's tokenizer, or None.
        datas: the run's data sources (None entries ignored).
    Returns:
        The tokenizer to use (None when every source is token ids).
    Example:
        >>> resolve_tokenizer(student, None, [torch.zeros(2, 8, dtype=torch.long)]) is None
        True
    """
    if tokenizer is not None or not any(d is not None and _needs_tokenizer(d) for d in datas):
        return tokenizer
    from minitron.models import resolve_tokenizer as student_tokenizer

    return student_tokenizer(student, required=True)
