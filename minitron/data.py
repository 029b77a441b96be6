"""Calibration / training text: load, tokenise and pack into fixed-length blocks.

Accepted inputs (no hub downloads ever):
- a ``datasets.Dataset`` (column ``text`` or ``input_ids``),
- a list/tuple of strings,
- a list of token-id lists (pre-tokenised, as in a Hugging Face ``input_ids`` column),
- a path to a UTF-8 ``.txt`` file (split into documents on blank lines) or ``.jsonl``
  file (any case; one document per line: an object with a ``text`` string, an
  ``input_ids`` list or ``messages`` (a chat: a list of ``{"role", "content"}`` dicts),
  a JSON string, or a list of token ids) or ``.json`` file (one JSON list of such records, or a
  flat list of token ids),
- a LongTensor of token ids, 1-D (a stream) or 2-D (already packed), or a ``.pt`` file holding one
  (read with ``torch.load(weights_only=True)``: no code runs).

Text documents are tokenised and joined with the EOS token, token-id documents are
concatenated as they are; the stream is cut into non-overlapping blocks of ``seq_len``
tokens (the tail shorter than a block is dropped). Unreadable input (binary or non-UTF-8
files, malformed JSON lines, a directory) raises a ValueError naming the file and line.

Chat / instruct models (``chat_template=True``): every plain-text document is rendered with
the tokenizer's chat template as one assistant turn (after an empty user turn when the template
insists on one), so calibration and training see the special tokens and the default system prompt
the model sees when it is used. Chats (``messages`` records, or list items that are a
``{"messages": [...]}`` dict or a list of role dicts) are always rendered with the template.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from .corpora import (  # noqa: F401  (re-exported: the shipped texts are data too)
    ASSETS_DIR, BUILTIN_CORPORA, BUILTIN_MODEL, BUILTIN_TEXT, BUILTIN_VALID_FRACTION, COMMONS_TEXT, WIKI_TEXT,
    builtin_documents, builtin_text,
)

DEFAULT_SEQ_LEN = 256  # calibration / search blocks when neither the user nor the data sets a length


def _read_text(path: Path) -> str:
    """The whole of a UTF-8 text file; a binary or non-UTF-8 file is named in the error."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); pass a UTF-8 .txt/.jsonl file")
    if "\x00" in text:
        raise ValueError(f"{path} looks binary (it holds NUL bytes); pass a UTF-8 .txt/.jsonl file")
    return text


def _token_list(value: Any) -> list[int] | None:
    """``value`` as a list of token ids if it is one (a list/tuple of ints or a 1-D integer tensor), else None."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist() if value.dim() <= 1 and not value.is_floating_point() else None
    if isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    return None


class _Chat:
    """A conversation (list of ``{"role", "content"}`` dicts) and where it came from."""

    def __init__(self, messages: Any, where: str) -> None:
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                      for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} dicts")
        self.messages, self.where = messages, where


def _as_chat(value: Any, where: str) -> _Chat | None:
    """``value`` as a chat if it is one (``{"messages": [...]}`` or a list of role dicts), else None."""
    if isinstance(value, dict) and "messages" in value:
        return _Chat(value["messages"], where)
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return _Chat(list(value), where)
    return None


def _render_chat(tokenizer: Any, doc: str | _Chat, chat_template: bool) -> tuple[str, bool]:
    """The text of one document and whether it already carries the template's special tokens."""
    if not isinstance(doc, _Chat) and not chat_template:
        return doc, False
    if getattr(tokenizer, "chat_template", None) is None:
        where = doc.where if isinstance(doc, _Chat) else "chat_template=True"
        raise ValueError(f"{where}: the tokenizer has no chat template; pass plain text, or a tokenizer of a chat model")
    if isinstance(doc, _Chat):
        return tokenizer.apply_chat_template(doc.messages, tokenize=False), True
    try:
        return tokenizer.apply_chat_template([{"role": "assistant", "content": doc}], tokenize=False), True
    except Exception:  # noqa: BLE001 - templates that require a user turn first (e.g. strict alternation)
        chat = [{"role": "user", "content": ""}, {"role": "assistant", "content": doc}]
        return tokenizer.apply_chat_template(chat, tokenize=False), True


def _jsonl_records(path: Path) -> Iterable[str | list[int] | _Chat]:
    """Documents of a .jsonl file: ``{"text": ...}``, ``{"input_ids": [...]}``, a JSON string or a list of ids."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text; pass a UTF-8 .jsonl file") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an "
                                 "object with a 'text' field, a JSON string or a list of token ids") from None
            yield _record(record, f"{path}:{lineno}", "jsonl record", "each line")


def _record(record: Any, where: str, what: str, each: str) -> str | list[int] | _Chat:
    """One document of a JSON/JSONL file: ``{"text"}``, ``{"input_ids"}``, ``{"messages"}``, a string or a list of ids."""
    if isinstance(record, dict) and "messages" in record:
        return _Chat(record["messages"], where)
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and _token_list(record.get("input_ids")) is not None:
        return _token_list(record["input_ids"])
    if isinstance(record, str):
        return record
    if _token_list(record) is not None:
        return _token_list(record)
    raise ValueError(f"{where}: {what} has no 'text' field (string), 'input_ids' list or 'messages' chat; {each} "
                     "must be an object with one, a JSON string or a list of token ids")


def _json_records(path: Path) -> Iterable[str | list[int] | _Chat]:
    """Documents of a .json file holding one JSON list: of strings, of token-id lists, of records as in
    .jsonl, or a flat list of token ids (one stream)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json file must hold one list (of strings, "
                         "token-id lists or {'text': ...} records), or use one record per line in a .jsonl file") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list; a .json file must hold one list (of "
                         "strings, token-id lists or {'text': ...} records), or use a .jsonl file")
    if data and _token_list(data) is not None:  # a flat list of ids: one pre-tokenised stream
        yield _token_list(data)
        return
    for i, record in enumerate(data):
        yield _record(record, f"{path}[{i}]", "item", "each item")


def _documents(data: Any) -> Iterable[str | list[int] | _Chat]:
    """Documents of ``data``: strings (to tokenise) or lists of token ids (already tokenised)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileNotFoundError(
                f"calibration/training data file not found: {path}; pass an existing .txt/.jsonl path, "
                "a list of strings or a datasets.Dataset"
            )
        if path.is_dir():
            raise ValueError(f"{path} is a directory; pass a .txt or .jsonl file")
        if path.suffix.lower() == ".jsonl":
            yield from _jsonl_records(path)
        elif path.suffix.lower() == ".json":  # one JSON document, not lines of text
            yield from _json_records(path)
        else:
            yield from (doc for doc in _read_text(path).split("\n\n") if doc.strip())
        return
    if isinstance(data, (list, tuple)):
        for i, doc in enumerate(data):
            if isinstance(doc, str):
                yield doc
            elif _as_chat(doc, f"data[{i}]") is not None:
                yield _as_chat(doc, f"data[{i}]")
            elif _token_list(doc) is not None:
                yield _token_list(doc)
            else:
                raise ValueError(f"data[{i}] is {type(doc).__name__}; a list of data must hold strings, lists of "
                                 "token ids or chats (lists of {'role', 'content'} dicts)")
        return
    column_names = getattr(data, "column_names", None)
    if column_names is not None:
        if "text" not in column_names:
            raise ValueError(f"dataset has columns {column_names}; it needs a 'text' or 'input_ids' column")
        yield from data["text"]
        return
    raise ValueError(
        f"unsupported data type {type(data).__name__}; pass a datasets.Dataset, a list of strings or of token-id "
        "lists, a .txt/.jsonl path or a LongTensor of token ids"
    )


def is_token_file(data: Any) -> bool:
    """Whether ``data`` is a path to a ``.pt`` token-id file."""
    return isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() == ".pt"


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


def resolve_seq_len(data: Any, seq_len: int | None, models: Iterable[Any] = (), *,
                    default: int = DEFAULT_SEQ_LEN, flag: str = "seq_len") -> int:
    """The block length of a run: the user's ``seq_len``, else the data's own, else a default that fits the models.

    A 2-D tensor (or ``.pt`` file) of token ids given with no ``seq_len`` is B blocks of S tokens and is used
    as such; any other data is packed into blocks of ``default`` tokens, lowered to the smallest
    ``max_position_embeddings`` of ``models``. Whichever length results is checked against those limits.

    Args:
        data: the run's training / calibration data (any kind :func:`load_text_blocks` takes).
        seq_len: the length the user asked for, or None.
        models: the models the blocks go through (their configs' ``max_position_embeddings`` bound the length).
        default: the length used for data without a shape of its own.
        flag: the option's name in error messages (``--seq-len`` on the command line).
    Returns:
        The tokens per block.
    Raises:
        ValueError: the length exceeds a model's ``max_position_embeddings`` (names the fix).

    Example:
        >>> resolve_seq_len(torch.zeros(8, 32, dtype=torch.long), None, [model])  # 8 blocks of 32 tokens
        32
    """
    limits = [(getattr(getattr(m, "config", None), "max_position_embeddings", None), m) for m in models]
    limit = min((mpe for mpe, _ in limits if isinstance(mpe, int) and mpe > 0), default=None)
    if seq_len is not None:
        if limit is not None and seq_len > limit:
            raise ValueError(f"{flag}={seq_len} exceeds the model's max_position_embeddings={limit}; lower {flag} "
                             f"to at most {limit}")
        return seq_len
    if is_token_file(data):
        data = load_token_file(data)
    if isinstance(data, torch.Tensor) and data.dim() == 2 and data.shape[1] > 0:
        rows = int(data.shape[1])
        if limit is not None and rows > limit:
            raise ValueError(f"the token-id blocks have {rows} tokens per row, more than the model's "
                             f"max_position_embeddings={limit}; pass rows of at most {limit} tokens, or set {flag} "
                             f"(at most {limit}) to re-pack them")
        return rows
    return default if limit is None else min(default, limit)


def load_text_blocks(
    data: Any, tokenizer: Any, seq_len: int, max_blocks: int | None = None, *, chat_template: bool = False
) -> torch.Tensor:
    """Tokenise and pack data into blocks of ``seq_len`` token ids.

    Args:
        data: see the module docstring for accepted kinds.
        tokenizer: a Hugging Face tokenizer (unused when ``data`` is already token ids).
        seq_len: tokens per block.
        max_blocks: keep at most this many blocks (the first ones); None = all.
        chat_template: render plain-text documents with the tokenizer's chat template, as one
            assistant turn each (for chat / instruct models; see the module docstring).
    Returns:
        LongTensor (n_blocks, seq_len).

    Example:
        >>> blocks = load_text_blocks(["some text", "more text"], tokenizer, seq_len=128)
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise ValueError(f"the number of blocks/samples must be a positive integer (or None for all), got {max_blocks!r}")
    if is_token_file(data):
        data = load_token_file(data)
    if isinstance(data, torch.Tensor):
        if data.is_floating_point() or data.dtype == torch.bool:
            raise ValueError(f"token-id tensor must be an integer tensor, got dtype {data.dtype}")
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
            eos = getattr(tokenizer, "eos_token_id", None)
            stream: list[int] = []
            kinds: set[str] = set()
            for doc in _documents(data):
                if isinstance(doc, list):  # pre-tokenised: taken as is (its own EOS tokens, if any)
                    kinds.add("token ids")
                    stream.extend(doc)
                    continue
                kinds.add("text")
                if tokenizer is None:
                    raise ValueError("text data needs a tokenizer: pass tokenizer=... (or token ids)")
                text, templated = _render_chat(tokenizer, doc, chat_template)
                # whole docs: no length warning; a rendered chat already holds its special tokens
                stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                if eos is not None and not templated:
                    stream.append(eos)
            if len(kinds) > 1:
                raise ValueError("data mixes text and token-id lists; pass one kind")
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
