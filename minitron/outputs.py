"""Output paths of ``prune`` / ``search`` / ``distill``: what a run may write, replace or delete.

The rules (also in the README, "What --out and --output-dir touch"):

- An output must not be, contain, or lie inside any input (model directory, data files, scores).
- An existing file, the current directory or one of its ancestors is never an output directory.
- A non-empty directory is used only if it is a previous minitron output of the same kind (it
  holds :data:`MARKER`, naming the kind) or the caller passes ``overwrite``.
- Nothing a minitron run did not write is deleted. A previous ``prune`` output is swapped
  atomically only if every file in it is listed in its marker; otherwise (``overwrite``) minitron's
  files are moved in one by one, replacing same-named files and leaving every other file alone.
- Writability is probed when the output is checked, before the long work starts.

Every check raises a one-line ``ValueError`` naming the path and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .atomic import OLD_PREFIX, PARTIAL, clean_stale_temps, fill_temp_dir, fsync_dir

MARKER = ".minitron-output.json"
_IGNORED = {MARKER, ".minitron.lock"}  # bookkeeping files that do not make a directory "used"


def _bookkeeping(name: str) -> bool:
    """Marker, lock, probe and temp entries of minitron itself (another rank may be creating them)."""
    return name in _IGNORED or name.startswith(".minitron-")


def read_marker(directory: str | os.PathLike) -> dict | None:
    """The marker of a minitron output directory (``{"kind": ..., "files": [...] | None}``), or None."""
    path = Path(directory) / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def mark_output_dir(directory: str | os.PathLike, kind: str) -> None:
    """Create ``directory`` (with parents) and record it as a ``minitron <kind>`` output.

    Used by outputs written in place (a distillation run, a search); the marker lists no files,
    so such a directory is never deleted as a whole.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if read_marker(directory) is None:
        from .atomic import atomic_write_text

        atomic_write_text(directory / MARKER, json.dumps({"kind": kind, "files": None}) + "\n")


def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def existing_paths(items: Iterable[object]) -> list[Path]:
    """The entries of ``items`` that are paths of existing files/directories (others are skipped).

    Args:
        items: anything the CLIs/APIs take as data: paths, strings, lists of texts, tensors, None.
    Returns:
        The existing paths, as given.
    """
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)) and str(item) and len(str(item)) < 4096:
            try:
                if Path(item).expanduser().exists():
                    out.append(Path(item))
            except OSError:  # e.g. a long text passed as data: not a path
                continue
    return out


def _check_against_inputs(path: Path, inputs: Iterable[object], flag: str) -> None:
    real = _resolve(path)
    for inp in existing_paths(inputs):
        r = _resolve(inp)
        if real == r:
            raise ValueError(f"{flag} {path} is the input {inp}; write the output to a new path")
        if real in r.parents:
            raise ValueError(f"{flag} {path} contains the input {inp}; choose an output that does not hold the inputs")
        if r in real.parents:
            raise ValueError(f"{flag} {path} lies inside the input {inp}; choose an output outside it")


def _nearest_existing(path: Path) -> Path:
    p = _resolve(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(path: Path, flag: str) -> None:
    """Create and remove a temp file where the output will be written; raise a ValueError if impossible."""
    places = {_nearest_existing(path.parent)}
    if path.is_dir():
        places.add(_resolve(path))
    for place in places:
        if not place.is_dir():
            raise ValueError(f"{flag} {path} cannot be created: {place} is a file; pass a path in a directory")
        try:
            fd, probe = tempfile.mkstemp(prefix=".minitron-probe-", dir=place)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ValueError(f"{flag} {path} is not writable ({place}: {e.strerror}); pass a writable location") from e


def _listed_files(directory: Path) -> set[str]:
    """Relative paths of every non-directory entry under ``directory`` (symlinks are not followed)."""
    out = set()
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        out.update((rel_root / f).as_posix() for f in files)
        out.update((rel_root / d).as_posix() for d in dirs if os.path.islink(os.path.join(root, d)))
    return out


def _foreign_files(directory: Path, marker: dict | None) -> list[str]:
    """Files in a previous output that its marker does not list (added by someone else)."""
    if marker is None or not isinstance(marker.get("files"), list):
        return []
    return sorted(_listed_files(directory) - set(marker["files"]) - _IGNORED)


def check_output_dir(path: str | os.PathLike, kind: str, *, inputs: Iterable[object] = (), overwrite: bool = False,
                     flag: str = "--out", fix: str = "--overwrite") -> Path:
    """Validate an output directory before any long work; raise a one-line ValueError if it is unsafe.

    Args:
        path: the output directory.
        kind: ``"prune"``, ``"search"`` or ``"distill"``.
        inputs: model directories, data and scores paths of the run (non-paths are ignored).
        overwrite: allow a non-empty directory that is not a previous output of this kind.
        flag: how the user named the output (``--out``, ``output_dir``) in messages.
        fix: how the user allows overwriting (``--overwrite``, ``overwrite=True``) in messages.
    Returns:
        ``Path(path)``.
    """
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; pass a directory path such as out/{kind}")
    p = Path(path)
    real, cwd = _resolve(p), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise ValueError(f"{flag} {path} is the current directory or contains it; pass a new subdirectory such as "
                         f"out/{kind}")
    _check_against_inputs(p, inputs, flag)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is an existing file; pass a directory path (the file is left alone)")
    if p.is_dir() and not overwrite:
        used = [e.name for e in p.iterdir() if not _bookkeeping(e.name)]
        marker = read_marker(p)
        if used and (marker is None or marker["kind"] != kind):
            if marker is not None:
                what = f"holds a `minitron {marker['kind']}` output, not a `minitron {kind}` one"
            else:
                hf = " (it holds a Hugging Face checkpoint)" if (p / "config.json").exists() else ""
                what = f"is not empty and was not written by `minitron {kind}`{hf}"
            raise ValueError(f"{flag} {path} {what}; pass a new or empty directory, or {fix} to write minitron's "
                             "files into it (other files are left alone)")
        foreign = _foreign_files(p, marker)
        if foreign:
            raise ValueError(f"{flag} {path} holds files minitron did not write ({', '.join(foreign[:3])}); pass a "
                             f"new or empty directory, or {fix} to replace only minitron's files")
    _probe_writable(p, flag)
    return p


def check_output_file(path: str | os.PathLike, *, inputs: Iterable[object] = (),
                      outside_of: Iterable[tuple[str, object]] = (), overwrite: bool = False,
                      is_ours: Callable[[Path], bool] = lambda p: False, flag: str = "--save-scores",
                      fix: str = "--overwrite") -> Path:
    """Validate an output file path before any long work; raise a one-line ValueError if it is unsafe.

    Args:
        path: the output file.
        inputs: input paths the file must not be or lie inside.
        outside_of: ``(name, directory)`` pairs the file must not lie inside (e.g. ``("--out", out)``,
            which is replaced as a whole).
        overwrite: allow replacing an existing file that ``is_ours`` does not recognise.
        is_ours: whether an existing file is a previous output of the same kind (replaced freely).
        flag, fix: names used in messages (see :func:`check_output_dir`).
    Returns:
        ``Path(path)``.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; pass a file path such as {Path(path) / 'scores.safetensors'}")
    _check_against_inputs(p, inputs, flag)
    real = _resolve(p)
    for name, directory in outside_of:
        if directory is not None and (_resolve(directory) == real or _resolve(directory) in real.parents):
            raise ValueError(f"{flag} {path} lies inside {name} {directory}, which is written as a whole; "
                             "write it elsewhere")
    if p.exists() and not overwrite and not is_ours(p):
        raise ValueError(f"{flag} {path} already exists and was not written by minitron; pass a new path or {fix}")
    _probe_writable(p, flag)
    return p


def _safe_rel(rel: object) -> bool:
    return isinstance(rel, str) and bool(rel) and not os.path.isabs(rel) and ".." not in Path(rel).parts


def _replaceable(target: Path, kind: str) -> bool:
    marker = read_marker(target)
    return (marker is not None and marker["kind"] == kind and isinstance(marker.get("files"), list)
            and not _foreign_files(target, marker))


def _merge(tmp: Path, target: Path, kind: str, files: list[str]) -> None:
    """Move the files of ``tmp`` into ``target`` one by one; drop files only the previous output of this kind wrote."""
    old = read_marker(target)
    for rel in files:
        dst = target / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir() and not dst.is_symlink():
            raise ValueError(f"cannot write {dst}: a directory of that name exists; remove it or choose another output")
        os.replace(tmp / rel, dst)
    if old is not None and old["kind"] == kind and isinstance(old.get("files"), list):
        for rel in set(old["files"]) - set(files):
            if _safe_rel(rel) and (target / rel).is_file():
                (target / rel).unlink()
    os.replace(tmp / MARKER, target / MARKER)


def write_output_dir(target: str | os.PathLike, kind: str, writer: Callable[[Path], None], *,
                     overwrite: bool = False) -> Path:
    """Write a user-facing output directory without ever deleting a file minitron did not write.

    ``writer(tmp)`` fills a temp directory next to ``target``; a marker listing its files is added.
    Then: a missing or empty ``target`` is replaced by a rename; a previous output of this kind whose
    files are all listed in its marker is swapped atomically; otherwise (only with ``overwrite``)
    the files are moved in one by one, replacing same-named files and leaving others in place.
    Check the path first with :func:`check_output_dir`.

    Args:
        target: the output directory.
        kind: ``"prune"`` or ``"search"``.
        writer: callable that writes the output files into the directory it receives.
        overwrite: allow writing into a non-empty directory that is not a replaceable previous output.
    Returns:
        ``Path(target)``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target.parent, target.name, signatures=(PARTIAL, MARKER))
    files: list[str] = []

    def fill(tmp: Path) -> None:
        writer(tmp)
        files.extend(sorted(f for f in _listed_files(tmp) if f not in (PARTIAL, MARKER)))
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": files}) + "\n", encoding="utf-8")

    tmp = fill_temp_dir(target, fill)
    try:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.replace(tmp, target)
        elif target.is_dir() and _replaceable(target, kind):
            trash = target.parent / f"{OLD_PREFIX}{target.name}-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)  # everything in it was written by the previous run (checked above)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        elif target.is_dir() and overwrite:
            _merge(tmp, target, kind, files)
        else:
            raise ValueError(f"{target} changed while the run was working (it is not a replaceable `minitron {kind}` "
                             "output any more); nothing was written to it")
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
