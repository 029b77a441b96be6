"""Atomic writes: a crash at any point leaves either the old file/directory or the new one.

Directories are written into a hidden temp directory next to the target, fsynced, then
renamed into place; files go through a fsynced temp file and ``os.replace``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_dir(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Create directory ``target`` atomically: ``writer(tmp_dir)`` fills a temp dir that is renamed.

    Args:
        target: final directory path (replaced if it exists).
        writer: callable that writes files into the temp directory it receives.
    Returns:
        ``Path(target)``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer(tmp)
        fsync_tree(tmp)
        if target.exists():  # rename() cannot replace a non-empty directory: move the old one aside
            trash = target.parent / f".old-{target.name}-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temp file and ``os.replace``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
