"""Checkpoint-streamed weight surgery: a :class:`~minitron.pruning.PrunePlan` applied tensor by tensor.

The edits are those of the in-memory :func:`minitron.pruning.apply_plan` (the same functions:
``_weight_ops`` for the keep-index gathers of every weight, ``fold_dropped_heads`` for the head
residual, ``_scalar_edits`` for norm rescales and scaled embeddings, ``pruned_config``), applied to
row chunks of each tensor read from the source checkpoint: a gather along dim 0 keeps the chunk's
kept rows, gathers along other dims and the folds / scalar edits act row by row, so a chunk's result
is exactly those rows of the in-memory result. The output is written as safetensors shards whose
header (names, dtypes, shapes, offsets) is known from the plan before any data is read; each
tensor's bytes are then appended chunk by chunk, so no whole tensor (not even a 2 GB embedding) is
ever held. Dtypes are kept as stored.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..adapters import get_adapter, head_dim_of, kv_heads_of
from ..ops.expert_gather import select_any
from ..pruning.apply import (_edit, _gather, _scalar_edits, _weight_ops, fold_dropped_heads, head_folds,
                             layer_renumbering, renamed_key)
from ..pruning.plan import PrunePlan
from ..validate import _all_finite
from .checkpoint import INDEX, SINGLE, CheckpointReader

__all__ = ["TensorJob", "plan_tensors", "write_shards"]

CHUNK_BYTES = 16 << 20  # source rows read per step (the write pass holds ~4 of these: pages, rows, fold, kept)
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


@dataclass
class TensorJob:
    """One output tensor: its source, the edits that make it, its output name and shape."""

    source: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    steps: list[tuple[int, torch.Tensor]]
    fold: torch.Tensor | None = None  # kept query heads (head residual of an o_proj weight)
    edit: tuple[float, float] | None = None  # (factor, offset) scalar edit

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_tensors(reader: CheckpointReader, model: nn.Module, plan: PrunePlan) -> list[TensorJob]:
    """Every tensor of the pruned checkpoint, in source order: name (layers renumbered), shape, edits.

    Args:
        reader: the source checkpoint.
        model: its ``meta`` skeleton (config, tied embeddings).
        plan: keep-indices from :func:`minitron.make_plan` / :func:`minitron.random_plan`.
    Returns:
        One :class:`TensorJob` per output tensor (dropped layers' tensors are left out).
    """
    adapter = get_adapter(model)
    config = model.config
    ops = _weight_ops(adapter, config, plan)
    edits = _scalar_edits(model, adapter, plan)
    renumber = layer_renumbering(config, plan)
    prefix = adapter.layers + "."
    folds = head_folds(adapter, plan)
    jobs = []
    for key in reader.names():
        name = renamed_key(key, prefix, renumber)
        if name is None:  # a dropped layer
            continue
        shape = list(reader.shape(key))
        steps = ops.get(key, [])
        for dim, index in steps:
            shape[dim] = int(index.numel())
        jobs.append(TensorJob(key, name, tuple(shape), reader.dtype(key), steps, folds.get(key), edits.get(key)))
    return jobs


def _row_chunks(reader: CheckpointReader, job: TensorJob, config) -> Iterator[torch.Tensor]:
    """The output rows of ``job``, a chunk at a time (each source row is read once)."""
    shape = reader.shape(job.source)
    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * job.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    keep0 = None  # composed dim-0 keep index (source rows)
    for dim, index in job.steps:
        if dim == 0:
            keep0 = index if keep0 is None else keep0[index]
    others = [(dim, index) for dim, index in job.steps if dim != 0]
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        local = None
        if keep0 is not None:
            local = keep0[(keep0 >= start) & (keep0 < stop)] - start
            if local.numel() == 0:
                continue
        t = reader.read(job.source, start, stop) if shape else reader.read(job.source)
        if t.is_floating_point() and not _all_finite(t):
            raise ValueError(f"the checkpoint's weight {job.source} holds NaN/inf values; the checkpoint is corrupt "
                             "or overflowed (nothing was written)")
        if job.fold is not None:  # row-wise: the fold of these rows is these rows of the fold
            t = fold_dropped_heads(t, job.fold, config.num_attention_heads // kv_heads_of(config), head_dim_of(config))
        if local is not None:
            t = select_any(t, 0, local)
        if others:
            t = _gather(t, others, inplace=False)
        if job.edit is not None:
            t = _edit(t, *job.edit, inplace=True)  # t is this chunk's own memory
        yield t.contiguous()


def _header(jobs: list[TensorJob]) -> bytes:
    """A safetensors header for ``jobs`` in order (8-byte length + JSON padded to 8 bytes)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for job in jobs:
        meta[job.name] = {"dtype": _CODES[job.dtype], "shape": list(job.shape),
                          "data_offsets": [offset, offset + job.nbytes]}
        offset += job.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_shards(reader: CheckpointReader, model: nn.Module, jobs: list[TensorJob], out: Path,
                 max_shard_bytes: int) -> dict[str, int]:
    """Write ``jobs`` as safetensors shards (+ ``model.safetensors.index.json`` when more than one) into ``out``.

    Args:
        reader: the source checkpoint.
        model: its ``meta`` skeleton (the unpruned config, for head folds).
        jobs: from :func:`plan_tensors`.
        out: an existing (temporary) folder.
        max_shard_bytes: tensor bytes per shard (a larger single tensor gets its own shard).
    Returns:
        ``{"bytes_written": ..., "shards": ...}``.
    Raises:
        RuntimeError: a tensor produced other than its planned bytes (a bug; the output is not kept).
    """
    shards: list[list[TensorJob]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    names = [SINGLE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    total = 0
    for file, shard in zip(names, shards):
        with open(out / file, "xb") as f:  # a new file in our own temp folder
            f.write(_header(shard))
            for job in shard:
                written = 0
                for chunk in _row_chunks(reader, job, model.config):
                    data = chunk.reshape(-1).view(torch.uint8).numpy()
                    f.write(memoryview(data))
                    written += data.nbytes
                if written != job.nbytes:
                    raise RuntimeError(f"pruned {job.name}: wrote {written} bytes, planned {job.nbytes}")
                total += written
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {job.name: file for file, shard in zip(names, shards) for job in shard}}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"bytes_written": total, "shards": len(shards)}
