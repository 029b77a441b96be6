"""Atomic writes: a crash at any point leaves either the old file/directory or the new one.

Directories are written into a hidden temp directory next to the target
(``.minitron-tmp-<name>-<pid>.<random>``, holding a ``.minitron-partial`` sentinel while it is
being filled), fsynced, then renamed into place; a replaced directory is first moved aside to
``.minitron-old-<name>-<pid>.<random>``. Files go through a fsynced temp file
(``.<name>.tmp-<pid>.<random>``, created exclusively) and ``os.replace``. Every temp name is new:
an entry that already exists under a name of this pattern (a user's, or another writer's) is never
reused, emptied or overwritten, and a temp folder is deleted only while it is still this write's (not
after it was renamed into place). A crash can leave those temp entries behind; :func:`clean_stale_temps`
removes them on the next start: entries with these names, of processes that are no longer running, and
outside a locked run directory only the files their marker proves minitron wrote.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Callable

TMP_PREFIX = ".minitron-tmp-"
OLD_PREFIX = ".minitron-old-"
PARTIAL = ".minitron-partial"  # sentinel inside a temp directory that is still being written
# ``.<random>`` is 8 hex digits (names without it, of older minitron versions, are still recognised)
_STALE = re.compile(r"^(\.minitron-tmp-|\.minitron-old-)(?P<name>.+)-(?P<pid>\d+)(\.[0-9a-f]{8})?$")
_STALE_FILE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(\.[0-9a-f]{8})?(\.[A-Za-z0-9]+)?$")  # temp files


def fresh_temp_name(directory: str | os.PathLike, stem: str, suffix: str = "") -> Path:
    """A path ``directory/<stem><pid>.<8 random hex digits><suffix>`` that does not exist yet.

    Every temp entry of this module and of :mod:`minitron.owned` is named by it, so a write never
    reuses (and so never empties or overwrites) an entry that is already there, whoever made it.

    Args:
        directory: where the entry will be created.
        stem: the name up to the process id, e.g. ``".minitron-tmp-final-"`` or ``".loss_curve.png.tmp-"``.
        suffix: appended after the random part (e.g. ``".png"`` for a file a library names by extension).
    Returns:
        The path (not created: create it exclusively, or rename onto it).
    Example:
        >>> fresh_temp_name("out", ".latest.tmp-").name  # doctest: +SKIP
        '.latest.tmp-4242.9f86d081'
    """
    while True:
        path = Path(directory) / f"{stem}{os.getpid()}.{secrets.token_hex(4)}{suffix}"
        if not os.path.lexists(path):
            return path


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike, name: str | None = None, owned: bool = False,
                      remove_proven: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove temp entries that an interrupted atomic write of this module left in ``directory``.

    Only ``.minitron-tmp-<name>-<pid>`` / ``.minitron-old-<name>-<pid>`` directories are considered,
    plus ``.<name>.tmp-<pid>`` files when ``owned`` (the caller holds the directory's run lock: its temp
    names are the run directory's own, and no writer can be alive). Elsewhere (a user's folder, next to an
    output) an entry of a process that is no longer running is handed to ``remove_proven``, which deletes only
    what it can prove minitron wrote (:func:`minitron.owned.remove_owned_dir`: each file its marker records
    with a hash that still matches); a folder it cannot empty, such as a write interrupted before its marker,
    stays and is named in a warning. This module sits below :mod:`minitron.owned`, hence the argument.

    Args:
        directory: folder to clean (missing: nothing to do).
        name: only entries of this target name (None = any name).
        owned: the caller owns the directory (a locked run directory).
        remove_proven: deletes a folder's proven files, True if the folder is gone (None: keep every entry
            of a not-owned directory).
    Returns:
        The paths removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        is_dir = entry.is_dir() and not entry.is_symlink()
        m = _STALE.match(entry.name) if is_dir else (_STALE_FILE.match(entry.name) if owned else None)
        if m is None or (name is not None and m.group("name") != name):
            continue
        if not owned:
            pid = int(m.group("pid"))
            if pid == os.getpid() or pid_alive(pid):
                continue
            if remove_proven is None or not remove_proven(entry):
                warnings.warn(f"{entry} is named like the temp folder of an interrupted minitron write (process {pid} "
                              "is gone), but no marker proves all its files are minitron's, so it was left in place; "
                              "delete it yourself if nothing in it is yours")
                continue
        elif is_dir:  # owned: the locked run directory's own temp names
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write_dir(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Create directory ``target`` atomically: ``writer(tmp_dir)`` fills a temp dir that is renamed.

    The previous ``target`` is replaced as a whole: use it only for directories this package owns
    (checkpoints inside a run directory); user-facing outputs go through
    :func:`minitron.outputs.write_output_dir`, which never deletes files it did not write.

    Args:
        target: final directory path (replaced if it exists).
        writer: callable that writes files into the temp directory it receives.
    Returns:
        ``Path(target)``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = fill_temp_dir(target, writer)
    placed = False
    try:
        if target.exists():  # rename() cannot replace a non-empty directory: move the old one aside
            trash = fresh_temp_name(target.parent, f"{OLD_PREFIX}{target.name}-")
            os.replace(target, trash)
            os.replace(tmp, target)
            placed = True
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
            placed = True
        fsync_dir(target.parent)
    finally:
        if not placed:  # once renamed, the temp name is free: whatever takes it later is not this write's
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def fill_temp_dir(target: Path, writer: Callable[[Path], None]) -> Path:
    """Write a complete, fsynced temp directory for ``target`` (next to it) and return its path.

    Args:
        target: the directory the temp directory will be renamed to.
        writer: callable that writes files into the temp directory it receives.
    Returns:
        The temp directory (the caller renames it into place); removed again if ``writer`` fails.
    """
    while True:
        tmp = fresh_temp_name(target.parent, f"{TMP_PREFIX}{target.name}-")
        try:
            tmp.mkdir()  # exclusive: a name another writer took in between is not shared
            break
        except FileExistsError:
            continue
    try:
        (tmp / PARTIAL).touch()
        writer(tmp)
        (tmp / PARTIAL).unlink()
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temp file and ``os.replace``."""
    path = Path(path)
    tmp = fresh_temp_name(path.parent, f".{path.name}.tmp-")
    with open(tmp, "x", encoding="utf-8", newline="") as f:  # the bytes are the text's (hashes recorded)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
