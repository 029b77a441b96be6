"""Local-only loading of Hugging Face checkpoints: never a download, corrupt files named.

Every ``from_pretrained`` in minitron passes ``local_files_only=True``; the helpers here add a
clear "not found locally" error for a typo or a hub id, and check a checkpoint's ``config.json``
and safetensors headers (a truncated file is named instead of failing deep inside transformers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def require_local_dir(path: str | os.PathLike, flag: str = "--model") -> Path:
    """Raise unless ``path`` is an existing local directory.

    Args:
        path: the checkpoint directory the user gave.
        flag: how the user named it, for the message.
    Returns:
        ``Path(path)``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path} not found locally; pass a local Hugging Face checkpoint directory "
                                "(minitron never downloads)")
    if not p.is_dir():
        raise ValueError(f"{flag} {path} is a file; pass a Hugging Face checkpoint directory")
    return p


def check_model_files(path: str | os.PathLike) -> None:
    """Raise a one-line error naming the file if a checkpoint's config or weights cannot be read.

    Args:
        path: a Hugging Face checkpoint directory (anything else is left to the loader).
    """
    p = Path(path)
    if not p.is_dir():
        return
    for name in ("config.json", "model.safetensors.index.json"):
        f = p / name
        if f.exists():
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{f} is not valid JSON ({e}); restore the checkpoint's files") from None
    from safetensors import safe_open

    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike: name the file
            raise ValueError(f"{f} is corrupt or truncated ({e}); restore or re-save the checkpoint") from None


def check_causal_lm_config(path: str | os.PathLike) -> None:
    """Raise minitron's one-line family list when ``config.json`` names a model type that has no causal LM
    class in transformers (T5, BERT...), instead of transformers' list of every causal-LM config.

    Args:
        path: a checkpoint directory whose ``config.json`` is valid JSON (:func:`check_model_files`).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = Path(path) / "config.json"
    fields = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    # a config with its own code (auto_map) is the custom-code check's to refuse, not this one's
    if isinstance(model_type, str) and "auto_map" not in fields and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        from .adapters import unsupported_message

        what = "not a causal language model" if model_type in CONFIG_MAPPING_NAMES else "unknown to transformers"
        raise ValueError(f"{path}: " + unsupported_message(model_type, what))


def load_causal_lm(path: str | os.PathLike, flag: str = "--model", **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` with clear errors.

    Args:
        path: local checkpoint directory.
        flag: how the user named it, for messages.
        **kwargs: passed to ``from_pretrained`` (e.g. ``dtype``).
    Returns:
        The model.
    """
    from transformers import AutoModelForCausalLM

    require_local_dir(path, flag)
    check_model_files(path)
    check_causal_lm_config(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, KeyError) as e:
        raise ValueError(f"{flag} {path} could not be loaded as a causal LM ({e})") from None


def load_tokenizer(path: str | os.PathLike, flag: str = "--tokenizer") -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` with clear errors."""
    from transformers import AutoTokenizer

    require_local_dir(path, flag)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{flag} {path}: no usable tokenizer there ({e})") from None
