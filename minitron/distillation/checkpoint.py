"""Atomic checkpoints of a distillation run.

Layout of ``output_dir``::

    checkpoints/step_000100/student/   HF checkpoint (config.json + model.safetensors)
    checkpoints/step_000100/trainer_state.pt   optimizer, scheduler, projections, RNG, data position
    latest                             text file: name of the newest complete checkpoint
    final/                             HF checkpoint of the trained student

Every directory is written into a hidden temp directory, fsynced, then renamed into place;
``latest`` is replaced with ``os.replace`` after the checkpoint it names exists. A crash at
any point leaves the previous checkpoint and pointer intact.

Every checkpoint carries a marker (``.minitron-output.json``, :mod:`minitron.owned`) recording
the SHA-256 of each of its files, written inside the temp directory before the rename; a resume
checks them before reading anything, so a bit flip is named, never resumed from. Loading never
runs code from the run directory: ``trainer_state.pt`` holds only tensors and plain Python values
(RNG states included) and is read with ``torch.load(weights_only=True)``; ``latest`` must name a
``step_<n>`` directory directly inside ``output_dir/checkpoints``. A checkpoint that is corrupt or
cannot be read is skipped, with a warning naming the file, in favour of the newest older one that
can (:func:`load_latest`); a run whose ``latest`` was removed resumes from its newest good
checkpoint instead of starting over on top of them.
"""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_dir, atomic_write_text  # noqa: F401 - re-exported
from ..owned import MARKER, matches, owned_dir, read_marker, recorded, remove_owned_dir, seal, write_text_owned

LATEST = "latest"
CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:06d}"


_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, or not written by minitron)."""


def _checkpoint_dir(output_dir: Path, name: str, pointer: Path) -> Path:
    """``output_dir/checkpoints/<name>`` if ``name`` is a plain ``step_<n>`` entry of that folder, else raise."""
    root = (output_dir / CKPT_DIR).resolve()
    path = output_dir / CKPT_DIR / name
    if not _STEP_DIR.match(name) or path.resolve().parent != root:
        raise ValueError(f"{pointer} names {name!r}, which is not a checkpoint inside {output_dir / CKPT_DIR}; "
                         f"delete {pointer} to resume from the newest checkpoint, or pass resume=False (CLI "
                         "--no-resume) to start over")
    return path


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``output_dir/latest`` points to, or None if there is none.

    Raises:
        ValueError: the pointer names anything but a complete ``step_<n>`` checkpoint inside
            ``output_dir/checkpoints`` (an absolute path, ``..``, a symlink out of the run...).
    """
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    if not pointer.is_file():
        return None
    path = _checkpoint_dir(output_dir, pointer.read_text(encoding="utf-8", errors="replace").strip(), pointer)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint; delete {pointer} to resume "
                         "from the newest complete one, or pass resume=False (CLI --no-resume) to start over")
    return path


def step_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoints/step_<n>`` directories of a run, oldest first (symlinks are ignored)."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and (if any) CUDA, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`."""
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    student: torch.nn.Module,
    student_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, move ``latest`` to it, prune old ones (call on rank 0 only).

    Args:
        output_dir: run directory.
        step: optimizer steps done.
        student: the student model (for ``save_pretrained``: config and class).
        student_state: full (gathered, CPU) student state dict.
        trainer_state: optimizer/scheduler/projection/RNG/data state, saved with ``torch.save``; only
            tensors and plain Python values (it is loaded with ``weights_only=True``).
        keep: keep only the newest ``keep`` checkpoints (None = all).
    Returns:
        The checkpoint directory.
    """
    output_dir = Path(output_dir)
    name = checkpoint_name(step)

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp / "student", state_dict=student_state)
        torch.save(trainer_state, tmp / TRAINER_STATE)
        seal(tmp, "checkpoint")  # the hashes a resume checks

    target = output_dir / CKPT_DIR / name
    if target.exists() and not owned_dir(target, corrupt_ok=True):  # checked before the run: a late arrival
        raise ValueError(f"{target} exists and was not written by minitron; move it away and resume")
    if target.exists() and not remove_owned_dir(target):  # a step redone after a corrupt checkpoint
        aside = target.with_name(f"corrupt-{name}-{os.getpid()}-{int(time.time())}")
        os.replace(target, aside)  # its changed files may be the user's now: moved, never deleted
        warnings.warn(f"{target} held files whose content is not what minitron wrote (corrupted or edited); "
                      f"they were moved to {aside}, not deleted")
    path = atomic_write_dir(target, write)
    write_text_owned(output_dir, LATEST, name + "\n")
    if keep is not None and keep > 0:
        old = [p for p in step_checkpoints(output_dir) if p.name != name]  # oldest first
        for p in old[: max(0, len(old) - (keep - 1))]:
            remove_owned_dir(p)  # only files whose recorded hash still matches: never a user's file
    return path


def verify_checkpoint(checkpoint: str | os.PathLike) -> None:
    """Check every file of a checkpoint against the SHA-256 recorded when it was saved.

    Args:
        checkpoint: a ``checkpoints/step_<n>`` directory.
    Raises:
        CorruptCheckpointError: no recorded hashes, a file missing, or a file whose content changed
            (named: ``trainer_state.pt`` "cannot be loaded safely", weights "are corrupt or truncated").
    """
    checkpoint = Path(checkpoint)
    files = recorded(read_marker(checkpoint))
    if not files:
        raise CorruptCheckpointError(f"{checkpoint} cannot be loaded safely (it has no {MARKER} recording its "
                                     "files' SHA-256: written by an older minitron or not by minitron)")
    for rel, entry in files.items():
        if not matches(checkpoint / rel, entry):
            f = checkpoint / rel
            what = "cannot be loaded safely (corrupted: " if rel == TRAINER_STATE else "is corrupt or truncated ("
            raise CorruptCheckpointError(f"{f} {what}its SHA-256 differs from the one recorded when it was saved)")


def last_good_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of a run whose files match their recorded hashes (None if there is none)."""
    for path in reversed(step_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError:
            continue
        return path
    return None


_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "data", "run")


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Read ``trainer_state.pt`` with ``torch.load(weights_only=True)`` (no code from the file runs).

    Raises:
        CorruptCheckpointError: the file is missing, truncated, holds objects other than tensors and
            plain values (e.g. written by an older minitron), or lacks trainer-state keys.
    """
    path = Path(checkpoint) / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, missing file: name the file
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CorruptCheckpointError(f"{path} cannot be loaded safely ({reason})") from None
    if not isinstance(state, dict) or any(k not in state for k in _STATE_KEYS):
        raise CorruptCheckpointError(f"{path} is not a minitron trainer state (keys missing)")
    return state


def load_student_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` file of an HF checkpoint directory into one state dict.

    Raises:
        CorruptCheckpointError: no weights there, or a file is truncated/corrupt (named).
    """
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CorruptCheckpointError(f"no .safetensors files in {path}")
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 - SafetensorError / OSError: name the file
            raise CorruptCheckpointError(f"{f} is corrupt or truncated ({e})") from None
    return state


def load_latest(output_dir: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]] | None:
    """The newest good checkpoint of a run: ``(directory, trainer_state, student_state)``.

    Starts at the checkpoint ``latest`` names (or, when ``latest`` is missing, at the newest
    ``step_<n>`` checkpoint, with a warning); if one of its files is corrupt (its hash differs from
    the one recorded at save time) or cannot be read, warns (naming the file) and tries the next
    older checkpoint.

    Args:
        output_dir: run directory.
    Returns:
        None if the run has neither a ``latest`` pointer nor checkpoints.
    Raises:
        ValueError: an invalid pointer (see :func:`latest_checkpoint`), or no good checkpoint
            (the message names the newest corrupt file).
    """
    output_dir = Path(output_dir)
    pointer = output_dir / LATEST
    step_of = {p.name: int(_STEP_DIR.match(p.name).group(1)) for p in step_checkpoints(output_dir)}
    if pointer.is_file():
        named = _checkpoint_dir(output_dir, pointer.read_text(encoding="utf-8", errors="replace").strip(), pointer)
    elif step_of:  # `latest` removed: the checkpoints are still this run's, never overwritten from step 0
        named = output_dir / CKPT_DIR / max(step_of, key=step_of.get)
        warnings.warn(f"{pointer} is missing; resuming from the newest checkpoint {named} (pass resume=False, "
                      "CLI --no-resume, to start over)")
    else:
        return None
    newest = int(_STEP_DIR.match(named.name).group(1))
    candidates = [named] + [output_dir / CKPT_DIR / n for n, s in sorted(step_of.items(), key=lambda kv: -kv[1])
                            if s < newest]
    first_error: CorruptCheckpointError | None = None
    for i, path in enumerate(candidates):
        try:
            verify_checkpoint(path)  # before anything is read from it
            return path, load_trainer_state(path), load_student_state(path / "student")
        except CorruptCheckpointError as e:
            first_error = first_error or e
            if i + 1 < len(candidates):
                warnings.warn(f"{e}; resuming from the older checkpoint {candidates[i + 1]} instead")
    raise ValueError(f"{first_error}; no older readable checkpoint in {output_dir / CKPT_DIR}: pass resume=False "
                     "(CLI --no-resume) to start over")


def tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """``{parameter name: names of the parameters it shares storage with}`` (tied embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: set(names) - {n} for names in groups.values() for n in names}


def check_student_tensors(loaded: dict[str, torch.Tensor], expected: dict[str, list[int]],
                          aliases: dict[str, set[str]], checkpoint: str | os.PathLike) -> None:
    """Raise unless a checkpoint's student tensors are exactly the student's (tied copies may be omitted).

    Args:
        loaded: the checkpoint's student state dict.
        expected: ``{key: shape}`` of the student being trained.
        aliases: :func:`tied_aliases` of the student.
        checkpoint: the checkpoint directory, for the message.
    """
    missing = [k for k in expected if k not in loaded and not (aliases.get(k, set()) & loaded.keys())]
    unexpected = [k for k in loaded if k not in expected]
    wrong = [k for k in loaded if k in expected and list(loaded[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        what = (f"lacks {len(missing)} student tensor(s) ({', '.join(missing[:3])})" if missing else
                f"has tensor(s) the student does not ({', '.join(unexpected[:3])})" if unexpected else
                f"has {wrong[0]} of shape {list(loaded[wrong[0]].shape)}, the student {expected[wrong[0]]}")
        raise ValueError(f"checkpoint {checkpoint} {what}; it does not match this student: pass resume=False "
                         "(CLI --no-resume) to start over, or the student it was trained from")
