"""Which files in an output folder minitron wrote, proven by the SHA-256 it recorded when writing them.

A folder minitron writes holds a marker, ``.minitron-output.json``::

    {"kind": "prune", "files": {"model.safetensors": "<sha256>", "sub/x.json": "<sha256>", ...}}

A file is minitron's (may be replaced or deleted) only if its marker entry matches its content
now; a name without an entry, a changed file, a symlink, or a path through a symlinked folder is
the user's and is never touched. An entry is a hex digest, ``{"size": n, "sha256": h}`` for an
append-only file whose first ``n`` bytes must hash to ``h``, or a list of such entries, any of
which matches (recorded just before a replace, so a crash between the two leaves either version
recognised).
A marker that is copied from elsewhere or hand-written therefore proves nothing. Markers nest:
a folder written as a unit (a checkpoint, ``final/``, ``best/``) carries its own marker, written
inside the temp folder before the rename, so its files are recognised whatever crashes when.

Nothing here follows a symlink: files are opened with ``O_NOFOLLOW`` and folders checked with
``lstat``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

MARKER = ".minitron-output.json"
LOCK = ".minitron.lock"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_regular(path: Path) -> int | None:
    """A read descriptor of ``path`` if it is a regular file reached without a symlink, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def file_digest(path: str | os.PathLike, size: int | None = None) -> str | None:
    """SHA-256 of a regular file (or of its first ``size`` bytes), never through a symlink.

    Args:
        path: the file.
        size: hash only this many leading bytes (None: the whole file).
    Returns:
        The hex digest, or None if ``path`` is missing, a symlink, not a regular file, or shorter than ``size``.
    Example:
        >>> file_digest("out/model.safetensors")
    """
    fd = _open_regular(Path(path))
    if fd is None:
        return None
    h, left = hashlib.sha256(), size
    with os.fdopen(fd, "rb") as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return None if left else h.hexdigest()


def text_digest(text: str) -> str:
    """SHA-256 of ``text`` as written by :func:`minitron.atomic.atomic_write_text` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def safe_join(root: str | os.PathLike, rel: object) -> Path | None:
    """``root / rel`` if ``rel`` is a plain relative path whose folders below ``root`` are real folders.

    Args:
        root: the output folder.
        rel: a relative path from a marker (untrusted).
    Returns:
        The path, or None for an absolute path, ``..``, or a folder on the way that is a symlink or a file.
    """
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        return None
    parts = Path(rel).parts
    if any(p in ("..", ".", "") for p in parts):
        return None
    cur = Path(root)
    for part in parts[:-1]:
        cur = cur / part
        try:
            if not stat.S_ISDIR(os.lstat(cur).st_mode):
                return None
        except FileNotFoundError:
            break  # nothing below exists yet: no link on the way
        except OSError:  # e.g. a file where a folder is expected
            return None
    return Path(root, *parts)


def matches(path: Path, entry: Any) -> bool:
    """Whether the file at ``path`` is the one a marker ``entry`` recorded (see the module docstring)."""
    if isinstance(entry, str):
        return file_digest(path) == entry
    if isinstance(entry, list):
        return any(matches(path, e) for e in entry if not isinstance(e, list))
    if isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str):
        return file_digest(path, entry["size"]) == entry["sha256"]
    return False


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The marker of ``directory`` (``{"kind": str, "files": ...}``), or None (none, a symlink, unreadable)."""
    fd = _open_regular(Path(directory) / MARKER)
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            marker = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def recorded(marker: dict | None) -> dict[str, Any]:
    """The ``files`` entries of a marker, or ``{}`` when it has no valid file table (nothing is trusted)."""
    files = (marker or {}).get("files")
    return files if isinstance(files, dict) and all(isinstance(k, str) for k in files) else {}


def has_file_table(marker: dict | None) -> bool:
    """Whether a marker records file hashes (older, copied or hand-written ones may list names or null)."""
    return marker is not None and isinstance(marker.get("files"), dict)


def digest_tree(root: str | os.PathLike, skip: tuple[str, ...] = (MARKER,)) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file under ``root`` (symlinks and ``skip`` names left out).

    Args:
        root: a folder minitron just wrote (a temp folder).
        skip: file names to leave out anywhere in the tree.
    Returns:
        The file table of the folder's marker.
    """
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if name in skip:
                continue
            digest = file_digest(path)
            if digest is not None:
                out[path.relative_to(root).as_posix()] = digest
    return dict(sorted(out.items()))


def write_marker(directory: str | os.PathLike, kind: str, files: dict[str, Any]) -> None:
    """Write ``directory``'s marker atomically (replacing a symlink by name, never writing through it)."""
    from .atomic import atomic_write_text

    atomic_write_text(Path(directory) / MARKER, json.dumps({"kind": kind, "files": files}, sort_keys=True) + "\n")


def seal(directory: str | os.PathLike, kind: str) -> dict[str, str]:
    """Record every file of a folder minitron just wrote (a temp folder, before its rename) in its marker.

    Returns:
        The file table written.
    """
    from .atomic import PARTIAL

    files = digest_tree(directory, skip=(MARKER, PARTIAL))  # PARTIAL: removed right after, by the caller
    write_marker(directory, kind, files)
    return files


def record(directory: str | os.PathLike, entries: dict[str, Any], drop: tuple[str, ...] = ()) -> None:
    """Add/replace ``entries`` (and remove ``drop``) in the file table of ``directory``'s existing marker."""
    marker = read_marker(directory)
    if marker is None:
        return
    files = {**recorded(marker), **entries}
    for rel in drop:
        files.pop(rel, None)
    write_marker(directory, marker["kind"], files)


def unowned(root: str | os.PathLike, sub: str = "", strict: bool = False) -> list[str]:
    """Files under ``root/sub`` that no marker proves minitron wrote (relative to ``root``), sorted.

    Each file is checked against the markers of its folder and of every folder above it up to
    ``root``. Symlinks (to files or folders) are always unowned; markers, locks and leftover temp
    entries of minitron's names are skipped (``strict``: only markers, for a folder deleted whole).

    Args:
        root: the output folder.
        sub: a relative path inside it (``""``: the whole folder).
        strict: skip nothing but marker files.
    Returns:
        The unowned relative paths (a symlinked or unreadable folder is listed itself).
    """
    root = Path(root)
    start = root / sub if sub else root
    out: list[str] = []
    try:
        mode = os.lstat(start).st_mode
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(mode):
        return [] if _owned_file(root, start) else [start.relative_to(root).as_posix()]
    for dirpath, dirs, files in os.walk(start):
        here = Path(dirpath)
        for d in list(dirs):
            if os.path.islink(here / d):
                out.append((here / d).relative_to(root).as_posix())
                dirs.remove(d)
            elif not strict and d.startswith((".minitron-tmp-", ".minitron-old-")):
                dirs.remove(d)
        for name in files:
            if name == MARKER or (not strict and (name == LOCK or _temp_file(name))):
                continue
            if not _owned_file(root, here / name):
                out.append((here / name).relative_to(root).as_posix())
    return sorted(out)


def _temp_file(name: str) -> bool:
    return name.startswith(".minitron-") or (name.startswith(".") and ".tmp-" in name)


def _owned_file(root: Path, path: Path) -> bool:
    """Whether some marker between ``path``'s folder and ``root`` records ``path`` with its current content."""
    folder = path.parent
    while True:
        entry = recorded(read_marker(folder)).get(path.relative_to(folder).as_posix())
        if entry is not None and matches(path, entry):
            return True
        if folder == root or root not in folder.parents:
            return False
        folder = folder.parent


def owned_dir(path: str | os.PathLike, corrupt_ok: bool = False) -> bool:
    """Whether ``path`` is a real folder whose own marker records every file in it (with its content).

    Args:
        path: a folder minitron writes as a unit (checkpoint, ``final/``, ``best/``).
        corrupt_ok: accept files whose content changed (a corrupted checkpoint is still minitron's
            to replace) as long as the marker names exactly the files there.
    """
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    files = recorded(read_marker(path))
    if not files:
        return False
    present = set()
    for dirpath, dirs, names in os.walk(path):
        if any(os.path.islink(Path(dirpath, d)) for d in dirs):
            return False
        present.update(Path(dirpath, n).relative_to(path).as_posix() for n in names if n != MARKER)
    if present != set(files):
        return False
    return corrupt_ok or all(matches(path / rel, files[rel]) for rel in present)


def remove_owned_dir(path: str | os.PathLike) -> bool:
    """Delete what a folder's marker proves minitron wrote: each recorded file whose content still has the
    recorded hash, then the marker and the emptied sub-folders once nothing else is left; True if the
    folder is gone.

    A file whose content changed, a file the marker does not name and anything behind a symbolic link
    stay where they are (with the marker, so the folder still says what was minitron's): a forged or
    stale marker can never make minitron delete a user's file.

    Args:
        path: a folder minitron writes as a unit (a checkpoint, ``final/``).
    Returns:
        Whether ``path`` no longer exists.
    Example:
        >>> remove_owned_dir(run / "checkpoints" / "step_100")
        True
    """
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return True
    for rel, entry in recorded(read_marker(path)).items():
        unlink_owned(path, rel, entry)  # only a regular file with the recorded content, no symlink on the way
    for dirpath, dirs, names in os.walk(path):  # symlinked folders are listed in dirs, never entered
        if any(os.path.islink(Path(dirpath, d)) for d in dirs) or any(Path(dirpath, n) != path / MARKER for n in names):
            return False  # something minitron cannot prove it wrote is left
    marker = path / MARKER
    if marker.is_file() and not marker.is_symlink():
        marker.unlink()
    for dirpath, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):  # deepest first: all empty now
        os.rmdir(dirpath)
    return True


def unlink_owned(root: str | os.PathLike, rel: str, entry: Any) -> bool:
    """Delete ``root/rel`` only if it is the file ``entry`` recorded (no symlink on the way); True if deleted."""
    path = safe_join(root, rel)
    if path is None or not matches(path, entry):
        return False
    path.unlink()
    return True


def write_text_owned(directory: str | os.PathLike, rel: str, text: str) -> None:
    """Replace ``directory/rel`` by ``text`` atomically and record it in ``directory``'s marker.

    The new digest is recorded first, next to the old one if the old file was minitron's, so a
    crash between the two writes leaves a file the marker still proves.
    """
    from .atomic import atomic_write_text, fresh_temp_name

    staged = fresh_temp_name(directory, f".{rel}.tmp-")
    atomic_write_text(staged, text)
    replace_owned(directory, rel, staged)


def replace_owned(directory: str | os.PathLike, rel: str, staged: str | os.PathLike) -> None:
    """Rename the finished file ``staged`` to ``directory/rel``, recording its hash first (see :func:`write_text_owned`).

    Args:
        directory: the output folder (its marker records the file).
        rel: the file's name there; a symlink of that name is replaced, never written through.
        staged: a complete file in ``directory`` (a temp name of :mod:`minitron.atomic`'s pattern).
    """
    path = Path(directory) / rel
    accept: list[Any] = [file_digest(staged)]
    entry = recorded(read_marker(directory)).get(rel)
    accept += [e for e in (entry if isinstance(entry, list) else [entry]) if e is not None and matches(path, e)][:1]
    record(directory, {rel: accept})
    os.replace(staged, path)


def record_prefix(directory: str | os.PathLike, rel: str) -> None:
    """Record the current content of the append-only file ``directory/rel`` as a prefix entry."""
    path = Path(directory) / rel
    try:
        size = os.lstat(path).st_size
    except FileNotFoundError:
        size = 0
    digest = file_digest(path, size) if size else hashlib.sha256(b"").hexdigest()
    if digest is not None:
        record(directory, {rel: {"size": size, "sha256": digest}})


def record_file(directory: str | os.PathLike, rel: str) -> None:
    """Record the current content of ``directory/rel`` (a file minitron just wrote) in the marker."""
    digest = file_digest(Path(directory) / rel)
    if digest is not None:
        record(directory, {rel: digest})
