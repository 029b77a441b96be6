"""Atomic checkpoints of a distillation run.

Layout of ``output_dir``::

    checkpoints/step_000100/student/   HF checkpoint (config.json + model.safetensors)
    checkpoints/step_000100/trainer_state.pt   optimizer, scheduler, projections, RNG, data position
    latest                             text file: name of the newest complete checkpoint
    final/                             HF checkpoint of the trained student

Every directory is written into a hidden temp directory, fsynced, then renamed into place;
``latest`` is replaced with ``os.replace`` after the checkpoint it names exists. A crash at
any point leaves the previous checkpoint and pointer intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_dir, atomic_write_text  # noqa: F401 - re-exported

LATEST = "latest"
CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:06d}"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``output_dir/latest`` points to, or None if there is none."""
    pointer = Path(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(output_dir) / CKPT_DIR / pointer.read_text(encoding="utf-8").strip()
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint; delete {pointer} to start over")
    return path


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch CPU and (if any) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        trainer_state: optimizer/scheduler/projection/RNG/data state, saved with ``torch.save``.
        keep: keep only the newest ``keep`` checkpoints (None = all).
    Returns:
        The checkpoint directory.
    """
    output_dir = Path(output_dir)
    name = checkpoint_name(step)

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp / "student", state_dict=student_state)
        torch.save(trainer_state, tmp / TRAINER_STATE)

    path = atomic_write_dir(output_dir / CKPT_DIR / name, write)
    atomic_write_text(output_dir / LATEST, name + "\n")
    if keep is not None and keep > 0:
        old = sorted(p for p in (output_dir / CKPT_DIR).glob("step_*") if p.is_dir() and p.name != name)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    return path


def load_student_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every ``*.safetensors`` file of an HF checkpoint directory into one state dict."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {path}")
    for f in files:
        state.update(load_file(str(f)))
    return state
