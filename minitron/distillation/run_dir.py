"""The run directory of a distillation: claim it, clean a crash's leftovers, and recognise its run.

- :func:`open_run_dir` marks the directory as a ``minitron distill`` output, takes its lock (one
  process per directory) and removes temp files that an interrupted run left behind.
- :func:`check_run_dir` (before any work) and :func:`start_over` (when a run does not resume):
  of the names a run writes (:data:`RUN_OUTPUTS`), only what the run folder's markers prove
  minitron wrote is removed (:mod:`minitron.owned`); with ``overwrite`` the rest is replaced by
  name (``final/`` file by file), never deleted as a folder.
- :func:`run_fingerprint` / :func:`check_same_run` decide whether a saved run is the run being
  started: same config (but for :data:`RESUME_FREE` fields), same student and teacher tensor
  shapes, same training tokens. Anything else is refused rather than silently resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from minitron.atomic import clean_stale_temps
from minitron.distillation.checkpoint import CKPT_DIR, LATEST, step_checkpoints
from minitron.distillation.config import DistillConfig
from minitron.outputs import check_output_dir, mark_output_dir
from minitron.owned import owned_dir, read_marker, record_prefix, recorded, remove_owned_dir, unlink_owned
from minitron.runlock import RunLock, acquire

RUN_FILE = "minitron_run.json"  # the run's config and fingerprint; never a Hugging Face file name
METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"
RUN_OUTPUTS = (LATEST, CKPT_DIR, "final", METRICS, PLOT, RUN_FILE)
IN_PLACE = tuple(n for n in RUN_OUTPUTS if n != CKPT_DIR)  # names replaced by name; checkpoints: check_run_dir
# config fields a resumed run may change: they do not alter the trajectory up to the saved step
RESUME_FREE = frozenset({"steps", "output_dir", "resume", "overwrite", "progress", "plot", "save_every", "eval_every",
                         "eval_batches", "keep_checkpoints", "log_every", "loss_impl", "parallel", "extra",
                         "threads", "time_budget_s"})


def open_run_dir(output_dir: str | os.PathLike) -> RunLock:
    """Create/mark ``output_dir``, lock it for this process and clean an interrupted run's temp files.

    Args:
        output_dir: the run directory (already checked with :func:`minitron.outputs.check_output_dir`).
    Returns:
        The held lock; release it when the run ends.
    Raises:
        OutputInUseError: another live process runs in this directory (its pid is named).
    """
    output_dir = Path(output_dir)
    mark_output_dir(output_dir, "distill")
    lock = acquire(output_dir)
    clean_stale_temps(output_dir, owned=True)  # we hold the lock: no other writer can be alive
    clean_stale_temps(output_dir / CKPT_DIR, owned=True)
    (output_dir / "loss_curve.tmp.png").unlink(missing_ok=True)
    return lock


def check_run_dir(output_dir: str | os.PathLike, *, inputs: list[object], overwrite: bool, flag: str = "output_dir",
                  fix: str = "overwrite=True") -> None:
    """Check a run directory before any work (:func:`minitron.outputs.check_output_dir` for :data:`IN_PLACE`).

    Also refuses, even with ``overwrite``, a ``checkpoints/step_<n>`` entry minitron did not write: a
    checkpoint is replaced as a whole folder, so it must be a folder whose own marker names exactly
    its files (one whose content changed is a corrupted checkpoint of the run: resume skips it);
    other files under ``checkpoints/`` are left alone.

    Args:
        output_dir: the run directory.
        inputs: the run's model directories and data (the output must not be, hold or lie in one).
        overwrite: allow a directory that is not a previous run; its files are replaced by name.
        flag, fix: names used in messages.
    """
    check_output_dir(output_dir, "distill", inputs=inputs, overwrite=overwrite, flag=flag, fix=fix, writes=IN_PLACE)
    ckpts = Path(output_dir) / CKPT_DIR
    if ckpts.is_symlink() or (ckpts.exists() and not ckpts.is_dir()):
        raise ValueError(f"{flag} {output_dir}: {ckpts} is a symbolic link or a file; move it away or choose "
                         "another output directory")
    taken = [p for p in (ckpts.iterdir() if ckpts.is_dir() else ()) if p.name.startswith("step_")
             and not owned_dir(p, corrupt_ok=True)]
    if taken:
        raise ValueError(f"{flag} {output_dir} holds {taken[0]}, which is not a minitron checkpoint; move it "
                         "away or choose another output directory")


def drop_weights(output_dir: str | os.PathLike) -> None:
    """Remove a run's checkpoints, ``latest`` and ``final/``: only what their markers prove minitron wrote.

    Args:
        output_dir: a distillation run directory.
    """
    output_dir = Path(output_dir)
    for path in step_checkpoints(output_dir):
        remove_owned_dir(path)  # a file whose content changed stays: it may be the user's now
    ckpts = output_dir / CKPT_DIR
    if ckpts.is_dir() and not ckpts.is_symlink() and not any(ckpts.iterdir()):
        ckpts.rmdir()
    # final/ is never read back: a file in it whose content is not what minitron wrote is the user's now
    if owned_dir(output_dir / "final"):
        remove_owned_dir(output_dir / "final")
    entry = recorded(read_marker(output_dir)).get(LATEST)
    if entry is not None:
        unlink_owned(output_dir, LATEST, entry)


def start_over(output_dir: str | os.PathLike) -> None:
    """Remove what a previous run wrote in ``output_dir``: only files and checkpoints its markers prove.

    A ``final/`` or other run file that is not minitron's (accepted with ``overwrite``) stays: it
    is replaced by name when the run writes it; ``metrics.jsonl`` is emptied then (it is appended to).
    """
    output_dir = Path(output_dir)
    drop_weights(output_dir)
    files = recorded(read_marker(output_dir))
    for name in (METRICS, PLOT, RUN_FILE):
        if name in files:
            unlink_owned(output_dir, name, files[name])
    if (output_dir / METRICS).exists() and not (output_dir / METRICS).is_symlink():
        from minitron.atomic import atomic_write_text

        atomic_write_text(output_dir / METRICS, "")  # a user's file of that name, with overwrite: replaced by name
    record_prefix(output_dir, METRICS)  # the rows this run appends are its own


def tensor_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{state-dict key: shape}`` of a model (its architecture, whatever its weights)."""
    return {k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def data_digest(blocks: torch.Tensor) -> str:
    """BLAKE2b digest of the token ids (identifies the training data without storing it)."""
    ids = blocks.detach().to("cpu", torch.int64).contiguous()
    return hashlib.blake2b(memoryview(ids.numpy()).cast("B"), digest_size=16).hexdigest()


def run_fingerprint(cfg: DistillConfig, student: nn.Module, teacher: nn.Module, train_blocks: torch.Tensor) -> dict:
    """What identifies a run: its config, the student/teacher shapes and the training tokens (JSON-safe)."""
    config = json.loads(json.dumps(cfg.to_dict(), default=repr))
    return {"config": config, "student": tensor_shapes(student), "teacher": tensor_shapes(teacher),
            "data": {"n_blocks": int(train_blocks.shape[0]), "seq_len": int(train_blocks.shape[1]),
                     "digest": data_digest(train_blocks)}}


def _shape_difference(saved: dict, current: dict, who: str) -> str | None:
    if saved == current:
        return None
    for key in sorted(set(saved) | set(current)):
        if key not in current:
            return f"the saved {who} has {key}, which this {who} lacks"
        if key not in saved:
            return f"this {who} has {key}, which the saved {who} lacks"
        if saved[key] != current[key]:
            return f"the {who}'s {key} is {saved[key]} there but {current[key]} here (a {who} of another shape)"
    return None


def describe_difference(saved: dict, current: dict) -> str | None:
    """How a saved run differs from the one being started, or None if it is the same run."""
    a, b = saved.get("config", {}), current["config"]
    diffs = [f"{k} is {a.get(k)!r} there but {b.get(k)!r} here" for k in sorted(set(a) | set(b))
             if k not in RESUME_FREE and a.get(k) != b.get(k)]
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        return f"its config differs: {diffs[0]}{more}"
    for who in ("student", "teacher"):
        diff = _shape_difference(saved.get(who, {}), current[who], who)
        if diff is not None:
            return diff
    d0, d1 = saved.get("data", {}), current["data"]
    if d0 != d1:
        if d0.get("n_blocks") != d1["n_blocks"]:
            return f"its training data has {d0.get('n_blocks')} blocks there but {d1['n_blocks']} here"
        return "its training data holds other tokens"
    return None


def check_same_run(saved: dict, current: dict, output_dir: str | os.PathLike) -> None:
    """Raise a ValueError if the run saved in ``output_dir`` is not the run being started."""
    diff = describe_difference(saved, current)
    if diff is not None:
        raise ValueError(f"{output_dir} holds a different distillation run ({diff}); pass another output_dir, or "
                         "resume=False (CLI --no-resume) to discard that run and start over")


def load_resumable(output_dir: str | os.PathLike, cfg: DistillConfig, run_info: dict, student: nn.Module
                   ) -> tuple[Path, dict, dict] | None:
    """The checked checkpoint ``(path, trainer state, student tensors)`` of this run in ``output_dir``, or None.

    Raises:
        ValueError: ``output_dir`` holds another run, a checkpoint past ``cfg.steps``, or student
            tensors that do not match ``student``.
    """
    from minitron.distillation.checkpoint import check_student_tensors, load_latest, tied_aliases

    resumed = load_latest(output_dir)
    if resumed is None:
        return None
    ckpt, state, saved_student = resumed
    check_same_run(json.loads(state["run"]), run_info, output_dir)
    if int(state["step"]) > cfg.steps:
        raise ValueError(f"checkpoint {ckpt} is at step {int(state['step'])}, past steps={cfg.steps}; pass steps "
                         f">= {int(state['step'])} to continue that run, or resume=False to start over")
    check_student_tensors(saved_student, run_info["student"], tied_aliases(student), ckpt)
    return resumed
