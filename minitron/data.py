"""Calibration / training text: load, tokenise and pack into fixed-length blocks.

Accepted inputs (no hub downloads ever):
- a ``datasets.Dataset`` (column ``text`` or ``input_ids``),
- a list/tuple of strings,
- a path to a ``.txt`` file (split into documents on blank lines) or ``.jsonl``
  file (one object per line, field ``text``, or field ``messages``: a chat as a list of
  ``{"role", "content"}`` dicts, rendered with the tokenizer's chat template),
- a LongTensor of token ids, 1-D (a stream) or 2-D (already packed).

Documents are tokenised, joined with the EOS token and cut into non-overlapping
blocks of ``seq_len`` tokens (the tail shorter than a block is dropped).

Chat / instruct models (``chat_template=True``): every plain-text document is rendered with
the tokenizer's chat template as one assistant turn (after an empty user turn when the template
insists on one), so calibration and training see the special tokens and the default system prompt
the model sees when it is used. Chats (``messages`` records) are always rendered with the template.
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
                        if isinstance(record, dict) and "messages" in record:
                            yield _Chat(record["messages"], f"{path}:{lineno}")
                        elif not isinstance(record, dict) or "text" not in record:
                            raise ValueError(f"{path}:{lineno}: jsonl record has no 'text' or 'messages' field")
                        else:
                            yield record["text"]
        else:
            yield from (doc for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip())
        return
    if isinstance(data, (list, tuple)):
        for i, doc in enumerate(data):
            if isinstance(doc, dict) and "messages" in doc:
                yield _Chat(doc["messages"], f"data[{i}]")
            elif isinstance(doc, (list, tuple)) and doc and all(isinstance(m, dict) and "role" in m for m in doc):
                yield _Chat(list(doc), f"data[{i}]")
            elif not isinstance(doc, str):
                raise ValueError(f"data[{i}] is {type(doc).__name__}; a list of data must hold strings "
                                 "(or chats: lists of {'role', 'content'} dicts)")
            else:
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


class _Chat(list):
    """A conversation (list of ``{"role", "content"}`` dicts) and where it came from."""

    def __init__(self, messages: Any, where: str) -> None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts")
        super().__init__(messages)
        self.where = where


def _render_chat(tokenizer: Any, doc: Any, chat_template: bool) -> tuple[str, bool]:
    """The text of one document and whether it already carries the template's special tokens."""
    if not isinstance(doc, _Chat) and not chat_template:
        return doc, False
    if getattr(tokenizer, "chat_template", None) is None:
        where = doc.where if isinstance(doc, _Chat) else "chat_template=True"
        raise ValueError(f"{where}: the tokenizer has no chat template; pass plain text, or a tokenizer of a chat model")
    if isinstance(doc, _Chat):
        return tokenizer.apply_chat_template(list(doc), tokenize=False), True
    try:
        return tokenizer.apply_chat_template([{"role": "assistant", "content": doc}], tokenize=False), True
    except Exception:  # noqa: BLE001 - templates that require a user turn first (e.g. strict alternation)
        chat = [{"role": "user", "content": ""}, {"role": "assistant", "content": doc}]
        return tokenizer.apply_chat_template(chat, tokenize=False), True


def load_text_blocks(
    data: Any, tokenizer: Any, seq_len: int, max_blocks: int | None = None, *, chat_template: bool = False
) -> torch.Tensor:
    """Tokenise and pack data into blocks of ``seq_len`` token ids.

    Args:
        data: see the module docstring for accepted kinds.
        tokenizer: a Hugging Face tokenizer (unused when ``data`` is already token ids).
        seq_len: tokens per block.
        max_blocks: keep at most this many blocks (the first ones).
        chat_template: render plain-text documents with the tokenizer's chat template, as one
            assistant turn each (for chat / instruct models; see the module docstring).
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
                text, templated = _render_chat(tokenizer, doc, chat_template)
                # whole docs: no length warning; a rendered chat already holds its special tokens
                stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                if eos is not None and not templated:
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
