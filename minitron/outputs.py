"""Output paths of ``prune`` / ``search`` / ``distill``: what a run may write, replace or delete.

The rules (also in the README, "What --out and --output-dir touch"):

- An output must not be, contain, or lie inside any input (model directory, data files, scores).
- An existing file, the current directory or one of its ancestors is never an output directory.
- A non-empty directory is used only if it is a previous minitron output of the same kind (it
  holds :data:`MARKER`, naming the kind and recording the SHA-256 of every file minitron wrote,
  :mod:`minitron.owned`) or the caller passes ``overwrite``. A marker without that table (copied,
  hand-written, older) makes nothing minitron's.
- Nothing a minitron run did not write is deleted, and no symlink is followed: a marker, lock or
  output name that is a symlink is refused. A previous ``prune`` output is swapped atomically only
  if every file in it is one its marker proves; otherwise (``overwrite``) minitron's files are
  moved in one by one, replacing same-named files and leaving every other file alone.
- Outputs written in place (``distill``, ``search``) name the entries they write (``writes``):
  each that exists must be minitron's, unless ``overwrite`` (then files are replaced by name).
- Every check, and a writability probe, runs when the output is checked, before the long work.

Every check raises a one-line ``ValueError`` naming the path and the fix.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

from .atomic import OLD_PREFIX, PARTIAL, clean_stale_temps, fill_temp_dir, fresh_temp_name, fsync_dir
from .owned import (LOCK, MARKER, digest_tree, has_file_table, owned_dir, read_marker, recorded, remove_owned_dir, safe_join,
                    unlink_owned, unowned, write_marker)

_IGNORED = {MARKER, LOCK}  # bookkeeping files that do not make a directory "used"


def _bookkeeping(name: str) -> bool:
    """Marker, lock, probe and temp entries of minitron itself (another rank may be creating them)."""
    return name in _IGNORED or name.startswith(".minitron-")


def mark_output_dir(directory: str | os.PathLike, kind: str) -> None:
    """Create ``directory`` (with parents) and record it as a ``minitron <kind>`` output.

    Used by outputs written in place (a distillation run, a search): the run records each file in
    the marker as it writes it (:func:`minitron.owned.record`). A marker of another kind, or one
    without a file table, is replaced by an empty one (the directory was accepted with ``overwrite``).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = read_marker(directory)
    if marker is None or marker["kind"] != kind or not has_file_table(marker):
        write_marker(directory, kind, {})


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


def _check_no_links(p: Path, names: Iterable[str], flag: str) -> None:
    """Refuse a marker, lock or output entry that is a symlink (or a marker/lock that is not a file)."""
    for name in (MARKER, LOCK, *names):
        entry = p / name
        if entry.is_symlink() or (name in _IGNORED and entry.exists() and not entry.is_file()):
            what = "a symbolic link" if entry.is_symlink() else "not a file"
            raise ValueError(f"{flag} {p}: {entry} is {what}; minitron never writes through a link or over a "
                             "folder of its own names: remove it or choose another directory")


def check_output_dir(path: str | os.PathLike, kind: str, *, inputs: Iterable[object] = (), overwrite: bool = False,
                     flag: str = "--out", fix: str = "--overwrite", writes: Iterable[str] = ()) -> Path:
    """Validate an output directory before any long work; raise a one-line ValueError if it is unsafe.

    Args:
        path: the output directory.
        kind: ``"prune"``, ``"search"`` or ``"distill"``.
        inputs: model directories, data and scores paths of the run (non-paths are ignored).
        overwrite: allow a non-empty directory that is not a previous output of this kind.
        flag: how the user named the output (``--out``, ``output_dir``) in messages.
        fix: how the user allows overwriting (``--overwrite``, ``overwrite=True``) in messages.
        writes: for an output written in place, the top-level names the run writes, replaces or
            deletes; empty: the output is written as a whole (``prune``), so every file must be minitron's.
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
    writes = tuple(writes)
    if p.is_dir():
        _check_no_links(p, writes, flag)
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
        if used and not has_file_table(marker):
            raise ValueError(f"{flag} {path}: its {MARKER} records no file hashes (copied, hand-written or from an "
                             f"older minitron), so no file there is known to be minitron's; pass a new or empty "
                             f"directory, or {fix} to write minitron's files into it (other files are left alone)")
        if writes:
            taken = [f for name in writes for f in unowned(p, name)]
            if taken:
                raise ValueError(f"{flag} {path} holds {', '.join(taken[:3])}, which minitron did not write (or "
                                 f"which changed since); move it away, pass a new directory, or {fix} to replace "
                                 "minitron's names there")
        else:  # written as a whole: replaced as a whole, so every entry must be minitron's
            foreign = unowned(p, strict=True)
            if foreign:
                raise ValueError(f"{flag} {path} holds files minitron did not write ({', '.join(foreign[:3])}); "
                                 f"pass a new or empty directory, or {fix} to replace only minitron's files")
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


def _replaceable(target: Path, kind: str) -> bool:
    """A previous output of this kind every file of which its marker proves (swapped as a whole)."""
    marker = read_marker(target)  # owned_dir: exactly the recorded files, none ignored by name (all are deleted)
    return marker is not None and marker["kind"] == kind and owned_dir(target)


def _merge(tmp: Path, target: Path, kind: str, files: dict[str, str]) -> None:
    """Move the files of ``tmp`` into ``target`` by name; drop files only the previous output of this kind wrote.

    No symlink is followed: a name is replaced as an entry (a link is replaced, its target untouched), a
    folder on the way must be a real folder, and an old file is deleted only if its recorded hash matches.
    """
    old = read_marker(target)
    for rel in files:
        dst = safe_join(target, rel)
        if dst is None:
            raise ValueError(f"cannot write {target / rel}: a folder on the way is a symbolic link or a file; "
                             "remove it or choose another output")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir() and not dst.is_symlink():
            raise ValueError(f"cannot write {dst}: a directory of that name exists; remove it or choose another output")
        os.replace(tmp / rel, dst)
    if old is not None and old["kind"] == kind:
        for rel, entry in recorded(old).items():
            if rel not in files:
                unlink_owned(target, rel, entry)
    os.replace(tmp / MARKER, target / MARKER)


def write_output_dir(target: str | os.PathLike, kind: str, writer: Callable[[Path], None], *,
                     overwrite: bool = False) -> Path:
    """Write a user-facing output directory without ever deleting a file minitron did not write.

    ``writer(tmp)`` fills a temp directory next to ``target``; a marker recording its files' hashes is added.
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
    clean_stale_temps(target.parent, target.name, remove_proven=remove_owned_dir)
    files: dict[str, str] = {}

    def fill(tmp: Path) -> None:
        writer(tmp)
        files.update(digest_tree(tmp, skip=(PARTIAL, MARKER)))
        write_marker(tmp, kind, files)  # the hashes that later prove these files are minitron's

    tmp = fill_temp_dir(target, fill)
    placed = False
    try:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.replace(tmp, target)
            placed = True
        elif target.is_dir() and _replaceable(target, kind):
            trash = fresh_temp_name(target.parent, f"{OLD_PREFIX}{target.name}-")
            os.replace(target, trash)  # everything in it was written by the previous run (checked above)
            os.replace(tmp, target)
            placed = True
            if not remove_owned_dir(trash):  # only the files its marker proves: one that arrived since stays
                warnings.warn(f"{target}'s previous output was moved to {trash}, where files minitron did not write "
                              "were found; they were left there")
        elif target.is_dir() and overwrite:
            _merge(tmp, target, kind, files)
        else:
            raise ValueError(f"{target} changed while the run was working (it is not a replaceable `minitron {kind}` "
                             "output any more); nothing was written to it")
        fsync_dir(target.parent)
    finally:
        if not placed:  # the temp folder this write made, still holding only what it wrote
            shutil.rmtree(tmp, ignore_errors=True)
    return target
