"""Local-only loading of Hugging Face checkpoints: never a download, never a checkpoint's own code.

Every ``from_pretrained`` in minitron goes through :func:`from_pretrained`: ``local_files_only=True``,
``trust_remote_code=False`` (a folder whose ``config.json`` has an ``auto_map`` to its own ``.py``
files is refused, never prompted for) and Hugging Face's offline mode set for the process (so not
even a metadata request leaves for a hub id). The helpers add a clear "not found locally" error
for a typo or a hub id, and check a checkpoint's ``config.json`` and safetensors headers (a
truncated file is named instead of failing deep inside transformers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class CustomCodeError(ValueError):
    """A checkpoint needs its own Python code to load; minitron never runs it."""


def go_offline() -> None:
    """Put this process in Hugging Face's offline mode (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``).

    ``local_files_only`` alone still lets huggingface_hub fetch metadata for a hub id; offline
    mode stops every request. huggingface_hub reads the variable once at import, so its constant
    is set too.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    hub.HF_HUB_OFFLINE = True


def from_pretrained(cls: Any, path: str | os.PathLike, flag: str = "--model", **kwargs: Any) -> Any:
    """``cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)`` in offline mode.

    Args:
        cls: a transformers class with ``from_pretrained`` (``AutoModelForCausalLM``, ``AutoTokenizer``...).
        path: local directory (or hub-cache name) to load.
        flag: how the user named it, for the message.
        **kwargs: passed on (e.g. ``dtype``, ``gguf_file``).
    Returns:
        What ``cls.from_pretrained`` returns.
    Raises:
        CustomCodeError: the checkpoint needs its own Python code (``auto_map``); it is never run.
    Example:
        >>> tok = from_pretrained(AutoTokenizer, "ckpt/", "--tokenizer")
    """
    go_offline()
    try:
        return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        from .adapters import SUPPORTED_MODEL_TYPES

        raise CustomCodeError(f"{flag} {path} needs custom code (its config names its own .py files in auto_map); "
                         "minitron never runs a checkpoint's own code: pass a checkpoint of a supported model_type "
                         f"({', '.join(SUPPORTED_MODEL_TYPES)})") from None


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
    """``AutoModelForCausalLM`` of a local folder (see :func:`from_pretrained`) with clear errors.

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
        return from_pretrained(AutoModelForCausalLM, path, flag, **kwargs)
    except (OSError, KeyError) as e:
        raise ValueError(f"{flag} {path} could not be loaded as a causal LM ({e})") from None
