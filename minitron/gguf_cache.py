"""GGUF files: checked before they are dequantised, their dequantised copies cached by content.

Dequantising a GGUF file (``transformers`` does it) takes ~30 s for 135M parameters on 2 CPU
cores, so :func:`minitron.models.load_gguf` keeps the result as a safetensors checkpoint under
``$MINITRON_CACHE/gguf/<stem>-<key>``. The key is the SHA-256 of the whole file: a different file
never hits another file's entry, whatever its path, size or modification time (hashing the 98 MB
SmolLM2-135M GGUF takes 0.075 s, against ~30 s to dequantise it). An entry is written atomically
and only for a file that passed :func:`check_gguf_file` and loaded with every weight present, so
random weights are never cached; an unreadable entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .atomic import atomic_write_dir

logger = logging.getLogger(__name__)

_MAGIC = b"GGUF"


def cache_root() -> Path:
    """``$MINITRON_CACHE`` (default ``~/.cache/minitron``)."""
    return Path(os.environ.get("MINITRON_CACHE", Path.home() / ".cache" / "minitron"))


def gguf_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's whole content: the cache key of its dequantised copy.

    Args:
        path: the GGUF file.
    Returns:
        64 hex digits.
    Example:
        >>> gguf_digest("model.gguf")[:16]
        '3f2a9c...'
    """
    digest, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:  # one reused buffer: as fast as hashlib.file_digest (Python >= 3.11)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def gguf_cache_dir(path: str | os.PathLike) -> Path:
    """The cache entry of a GGUF file: ``$MINITRON_CACHE/gguf/<stem>-<first 16 hex digits of its SHA-256>``."""
    path = Path(path)
    return cache_root() / "gguf" / f"{path.stem}-{gguf_digest(path)[:16]}"


def check_gguf_file(path: str | os.PathLike) -> int:
    """Raise a one-line ValueError naming ``path`` unless it is a complete GGUF file holding weights.

    Args:
        path: the GGUF file.
    Returns:
        The number of tensors it holds (>= 1).
    Raises:
        ValueError: not a GGUF file, truncated or corrupt (the tensor data does not fit the file),
            or no tensors at all (a tokenizer/metadata-only file).
    Example:
        >>> check_gguf_file("SmolLM2-135M-Instruct.Q4_1.gguf")
        272
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (no GGUF header); pass a .gguf model file")
    (n_tensors,) = struct.unpack_from("<Q", head, 8)
    if n_tensors == 0:
        raise ValueError(f"{path} holds no weights (0 tensors: tokenizer and metadata only); pass a GGUF file "
                         "with the model's tensors, e.g. one written by llama.cpp's convert_hf_to_gguf.py")
    from gguf import GGUFReader

    try:  # the reader maps every tensor's data: a short file fails here (numpy's reshape error)
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - ValueError, struct.error, IndexError...: name the file
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); re-download or "
                         "re-convert the GGUF file") from None
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    size = path.stat().st_size
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; re-download or "
                         "re-convert the GGUF file")
    return len(reader.tensors)


def read_cache(cached: Path, load: Callable[[Path], tuple[nn.Module, Any]]) -> tuple[nn.Module, Any] | None:
    """The model and tokenizer of a cache entry, or None when there is none or it cannot be read (logged).

    Args:
        cached: the entry (:func:`gguf_cache_dir`).
        load: reads a checkpoint directory (a truncated safetensors file raises).
    Returns:
        ``(model, tokenizer)`` or None (the caller dequantises again and rewrites the entry).
    """
    if not (cached / "config.json").is_file():
        return None
    try:
        return load(cached)
    except Exception as err:  # noqa: BLE001 - a broken entry is rebuilt, never trusted
        logger.warning("minitron: the GGUF cache entry %s is unreadable (%s); rebuilding it", cached, err)
        return None


def write_cache(cached: Path, model: nn.Module, tokenizer: Any) -> bool:
    """Write (or replace) a cache entry atomically; a failure only costs the speed-up (logged).

    Args:
        cached: the entry (:func:`gguf_cache_dir`); an existing, broken one is replaced as a whole.
        model: the dequantised float model, every weight read from the file.
        tokenizer: its tokenizer.
    Returns:
        Whether the entry was written.
    """
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    try:
        atomic_write_dir(cached, write)
    except OSError as err:
        logger.warning("minitron: could not cache the dequantised GGUF model in %s (%s)", cached, err)
        return False
    logger.info("minitron: cached the dequantised model in %s (later loads take seconds)", cached)
    return True
