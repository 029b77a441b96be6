"""Calibration / training text: load, tokenise and pack into fixed-length blocks.

Accepted inputs (no hub downloads ever):
- a ``datasets.Dataset`` (column ``text`` or ``input_ids``),
- a list/tuple of strings,
- a path to a ``.txt`` file (split into documents on blank lines) or ``.jsonl``
  file (one object per line, field ``text``),
- a LongTensor of token ids, 1-D (a stream) or 2-D (already packed).

Documents are tokenised, joined with the EOS token and cut into non-overlapping
blocks of ``seq_len`` tokens (the tail shorter than a block is dropped).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_TEXT = ASSETS_DIR / "pydoc_topics.txt"
BUILTIN_MODEL = ASSETS_DIR / "tiny-llama-pydoc"
BUILTIN_VALID_FRACTION = 0.1  # the tail of the text the built-in model never saw in training


def builtin_text(split: str = "train") -> str:
    """The built-in English corpus: the Python reference manual's topic pages shipped by CPython.

    Args:
        split: ``"train"`` (first 90%, what the built-in model was trained and is
            calibrated on) or ``"valid"`` (last 10%, held out, used for perplexity).
    Returns:
        The text of that split.
    """
    text = BUILTIN_TEXT.read_text(encoding="utf-8")
    cut = int(len(text) * (1 - BUILTIN_VALID_FRACTION))
    if split == "train":
        return text[:cut]
    if split == "valid":
        return text[cut:]
    raise ValueError(f"unknown split={split!r}; allowed values: train, valid")


def _documents(data: Any) -> Iterable[str]:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(
                f"calibration/training data file not found: {path}; pass an existing .txt/.jsonl path, "
                "a list of strings or a datasets.Dataset"
            )
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "text" not in record:
                            raise ValueError(f"{path}:{lineno}: jsonl record has no 'text' field")
                        yield record["text"]
        else:
            yield from (doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip())
        return
    if isinstance(data, (list, tuple)):
        for i, doc in enumerate(data):
            if not isinstance(doc, str):
                raise ValueError(f"data[{i}] is {type(doc).__name__}; a list of data must hold strings")
            yield doc
        return
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"dataset has columns {column_names}; it needs a 'text' or 'input_ids' column")
        yield from data["text"]
        return
    raise ValueError(
        f"unsupported data type {type(data).__name__}; pass a datasets.Dataset, a list of strings, "
        "a .txt/.jsonl path or a LongTensor of token ids"
    )


def load_text_blocks(data: Any, tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise and pack data into blocks of ``seq_len`` token ids.

    Args:
        data: see the module docstring for accepted kinds.
        tokenizer: a Hugging Face tokenizer (unused when ``data`` is already token ids).
        seq_len: tokens per block.
        max_blocks: keep at most this many blocks (the first ones).
    Returns:
        LongTensor (n_blocks, seq_len).

    Example:
        >>> blocks = load_text_blocks(["some text", "more text"], tokenizer, seq_len=128)
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
    if isinstance(data, torch.Tensor):
        ids = data.long()
        if ids.dim() == 2 and ids.shape[1] == seq_len:
            blocks = ids
        else:
            blocks = _pack(ids.reshape(-1), seq_len)
    else:
        column_names = getattr(data, "column_names", None)
        if column_names is not None and "input_ids" in column_names:
            ids = torch.tensor([t for row in data["input_ids"] for t in row], dtype=torch.long)
        else:
            if isinstance(data, (str, os.PathLike)) and not Path(data).exists():
                next(iter(_documents(data)))  # raises FileNotFoundError naming the path
            if tokenizer is None:
                raise ValueError("a tokenizer is required to tokenise text data")
            eos = tokenizer.eos_token_id
            stream: list[int] = []
            for doc in _documents(data):
                stream.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])  # whole docs: no length warning
                if eos is not None:
                    stream.append(eos)
            ids = torch.tensor(stream, dtype=torch.long)
        blocks = _pack(ids, seq_len)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if blocks.shape[0] == 0:
        raise ValueError(
            f"empty calibration/training data: fewer than seq_len={seq_len} tokens after tokenisation; "
            "provide more text or lower seq_len"
        )
    return blocks


def _pack(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)  # (n_blocks, seq_len)
