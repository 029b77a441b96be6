"""``metrics.jsonl`` of a distillation run: one JSON object per line, crash-safe.

- Rows are appended and flushed one line at a time; the file is never rewritten in place. On
  resume it is cut back to the resumed step by writing a new file and renaming it over the old
  one (:func:`truncate_after`), so a ``kill -9`` at any moment loses no row before that step.
- A crash can leave a partial last line; readers skip it (:func:`read_rows`), and the resume cut
  drops it.
- Every line is strict JSON: a non-finite float is written as the string ``"nan"``, ``"inf"`` or
  ``"-inf"`` (``float(value)`` turns it back into a float), never as the non-standard ``NaN``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from minitron.atomic import atomic_write_text


def _finite_or_str(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_or_str(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_str(v) for v in value]
    return value


def to_json_line(row: dict) -> str:
    """One strict-JSON line (non-finite floats as strings, see the module docstring), with the newline."""
    return json.dumps(_finite_or_str(row), allow_nan=False) + "\n"


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row to the metrics file and flush it."""
    # O_NOFOLLOW: a symlink put in place of the file is refused, never appended through
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(to_json_line(row))
        f.flush()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All complete rows of a metrics file (empty list if it does not exist).

    A last line that is not valid JSON (cut by a crash) is skipped silently; any other bad line is
    skipped with a warning naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last element is the unterminated tail (b"" if the file ends with a newline)
    rows = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError is a ValueError too
            if i < len(lines) - 1:  # a complete line that is broken: not a crash artefact
                warnings.warn(f"{path}:{i + 1}: skipping a line that is not valid JSON")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncated_text(path: str | os.PathLike, step: int) -> str:
    """The metrics file's content cut back to the rows with ``step <= step`` (no partial line)."""
    rows = [r for r in read_rows(path) if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step]
    return "".join(to_json_line(r) for r in rows)


def truncate_after(path: str | os.PathLike, step: int) -> None:
    """Keep the rows with ``step <= step`` (and no partial line), replacing the file atomically."""
    atomic_write_text(path, truncated_text(path, step))


def as_float(value: Any) -> float:
    """A metric value as a float (``"nan"``/``"inf"`` strings included; None is NaN)."""
    return float("nan") if value is None else float(value)
