"""Training/eval data for distillation: packed token blocks and a deterministic batch order.

Packing is delegated to the shared loader :func:`minitron.data.load_text_blocks`; this module
adds ``.pt`` token-id files and an early empty-data check.
The batch order is a pure function of ``(seed, step)``, so a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from minitron.data import load_text_blocks


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
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() == ".pt":
        data = load_token_file(data)
    check_nonempty(data)
    blocks = load_text_blocks(data, tokenizer, seq_len, max_blocks=max_blocks, chat_template=chat_template)
    if blocks.shape[0] == 0:
        raise ValueError(
            f"empty data: fewer than seq_len={seq_len} tokens after tokenisation; provide more data or lower seq_len"
        )
    return blocks.long().contiguous()


def load_token_file(path: str | os.PathLike) -> torch.Tensor:
    """Read a ``.pt`` file holding a LongTensor of token ids (``torch.load(weights_only=True)``: no code runs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token-id file not found: {path}; pass an existing .pt file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a .pt file holding a LongTensor of token ids")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle with code, ...: name the file
        raise ValueError(f"{path} is not a readable tensor file ({type(e).__name__}); save token ids with "
                         "torch.save(LongTensor, path)") from None
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a tensor of token ids")
    return data


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
