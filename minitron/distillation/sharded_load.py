"""Sharded loading of a distillation run: models built on ``meta``, each rank reading only its own rows.

:func:`meta_model` builds the model of a safetensors checkpoint folder on ``meta`` (buffers real:
the rotary ``inv_freq`` and embedding scales are computed by the model's constructor, exactly as in
``from_pretrained``) and remembers the folder. Passed to :func:`minitron.distill` with
``parallel="fsdp"``, it is wrapped by ``fully_shard`` while still on ``meta``
(:func:`minitron.distillation.distributed.wrap`), and :func:`materialise` then gives every
parameter storage on the run's device and fills it from the files:

* an FSDP2 parameter is a ``DTensor`` sharded on dim 0 over a 1-D mesh (``Shard(0)``, torch.chunk
  split: rank ``r`` of ``w`` owns rows ``[r * ceil(n / w), min(n, (r + 1) * ceil(n / w)))``, possibly
  none); only those rows are read from the file (``safe_open(...).get_slice``), so a rank holds about
  ``(student + teacher) / world`` plus the one tensor being read;
* a plain parameter (one process, or DDP) is read whole.

No collective is needed to load, so gloo/CPU and NCCL behave alike; a NaN/inf row makes every rank
raise (one all-reduced flag), never a hang. Tied embeddings stay one parameter (checked after the
storage is allocated; ``lm_head.weight`` of a tied checkpoint is not in the file and is the
embedding). A student that exists only in memory (e.g. pruned in this process) is not built on
``meta``: it is trained as given beside a ``meta`` teacher (each rank holds the whole student until
``fully_shard`` replaces its tensors by shards; the full copies are then freed). To load it in shards
as well, save it (``save_pretrained``) and pass :func:`meta_model` of that folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.adapters import lm_head_params
from minitron.validate import _all_finite

__all__ = ["check_meta_teacher_padding", "load_run_model", "materialise", "meta_model", "on_meta",
           "sharded_run"]

SOURCE_ATTR = "_minitron_checkpoint"  # the CheckpointReader a meta model is materialised from


def meta_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of checkpoint folder ``path`` with its parameters on ``meta``, to load sharded.

    Args:
        path: a Hugging Face checkpoint folder with safetensors weights (``save_pretrained``).
        dtype: parameter dtype once materialised (default float32, as :func:`minitron.load_model`).
    Returns:
        The model (eval mode, parameters on ``meta``, buffers real); pass it to :func:`minitron.distill`
        with ``parallel="fsdp"`` under ``torchrun`` (in one process or under DDP it is loaded whole).
    Raises:
        ValueError: a GGUF file (convert it first), a folder without safetensors weights, a
            mixture-of-experts checkpoint or one whose tensors transformers converts at load time.
    Example:
        >>> teacher = meta_model("llama-8b/")   # no weight read yet
        >>> distill(meta_model("pruned/"), teacher, "train.jsonl", parallel="fsdp", output_dir="run/")
    """
    from minitron.streaming.checkpoint import CheckpointReader, skeleton

    p = Path(path)
    if p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").is_file() and any(p.glob("*.gguf"))):
        raise ValueError(f"{path} is a GGUF model, which cannot be read in shards; convert it first: "
                         "model, tok = minitron.load_model(GGUF); model.save_pretrained(DIR); tok.save_pretrained(DIR)")
    reader = CheckpointReader(p)
    model = skeleton(p, dtype, reader)  # refuses MoE and converted layouts with one line
    object.__setattr__(model, SOURCE_ATTR, reader)  # not a submodule, not in the state dict
    model.config._name_or_path = str(p)  # the run's inputs (an output_dir must avoid it), the tokenizer
    return model


def sharded_run(parallel: str) -> bool:
    """True when a run loads its models in shards: ``parallel="fsdp"`` under ``torchrun`` with 2+ processes."""
    return parallel == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def load_run_model(source: str | os.PathLike, gguf_file: str | None = None, *, sharded: bool) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a distillation run: a :func:`meta_model` when ``sharded``, else loaded whole.

    A GGUF source (incl. the built-in SmolLM2) cannot be read in shards: it is loaded whole on every
    rank, as without sharding, and a line says how to convert it.

    Args:
        source: what :func:`minitron.load_model` accepts.
        gguf_file: a GGUF file name inside ``source``.
        sharded: :func:`sharded_run` of the run.
    Returns:
        The model (on ``meta`` when loaded sharded) and its tokenizer (``None`` if the folder has none).
    Example:
        >>> teacher, tok = load_run_model("llama/", sharded=sharded_run("fsdp"))
    """
    from minitron.models import load_model, resolve_model_source, resolve_tokenizer

    kind, path = resolve_model_source(source, gguf_file)
    if not sharded or kind == "gguf":
        if sharded:
            print(f"minitron: {path} is a GGUF model, loaded whole on every rank (it cannot be read in shards); for "
                  "sharded loading convert it first: minitron.load_model(GGUF)[0].save_pretrained(DIR)")
        return load_model(source, gguf_file=gguf_file)
    model = meta_model(path)
    return model, resolve_tokenizer(model)


def on_meta(module: nn.Module | None) -> bool:
    """True if any parameter of ``module`` is still on ``meta`` (awaiting :func:`materialise`)."""
    return module is not None and any(p.is_meta for p in module.parameters())


def _sources(root: nn.Module) -> list[tuple[str, object]]:
    """``(module prefix, CheckpointReader)`` of every meta model under ``root``, longest prefix first."""
    found = [(name, getattr(m, SOURCE_ATTR)) for name, m in root.named_modules() if hasattr(m, SOURCE_ATTR)]
    return sorted(found, key=lambda x: -len(x[0]))


def _owner(name: str, sources: list[tuple[str, object]]) -> tuple[object, str]:
    for prefix, reader in sources:
        if not prefix or name.startswith(prefix + "."):
            return reader, name[len(prefix) + 1:] if prefix else name
    raise ValueError(f"parameter {name} is on meta but belongs to no model built by meta_model(); build every "
                     "meta model with minitron.distillation.sharded_load.meta_model")


def _rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The storage to fill for parameter ``p`` and the first checkpoint row it holds.

    FSDP2 shards dim 0 over a 1-D mesh like ``torch.chunk``: with ``c = ceil(n / w)`` rank ``r`` holds
    rows ``[r * c, min(n, (r + 1) * c))``, so the last ranks may hold fewer rows or none (FSDP pads
    its own storage; the unpadded view is what is filled here).
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p.data, 0
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(f"sharded loading supports FSDP2's Shard(0) over a 1-D mesh, got {p.placements} over a "
                         f"{p.device_mesh.ndim}-D mesh; wrap with minitron.distillation.distributed.wrap")
    local = p.to_local()  # a view of FSDP's own sharded storage
    n, w = p.shape[0], p.device_mesh.size()
    start = p.device_mesh.get_local_rank() * math.ceil(n / w)
    if local.shape[0] and (start + local.shape[0] > n or tuple(local.shape[1:]) != tuple(p.shape[1:])):
        raise ValueError(f"unexpected FSDP shard layout: local {tuple(local.shape)} at row {start} of {tuple(p.shape)}")
    return local, start


def _allocate(root: nn.Module, device: torch.device) -> None:
    """Give every meta parameter (and buffer) of ``root`` uninitialised storage on ``device``, ties kept."""
    tied = []
    for m in root.modules():
        if hasattr(m, SOURCE_ATTR) and getattr(m.config, "tie_word_embeddings", False):
            out, emb = m.get_output_embeddings(), m.get_input_embeddings()
            if out is not None and out.weight is emb.weight:
                tied.append((out, emb))
    for m in root.modules():
        own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            m.to_empty(device=device, recurse=False)  # a DTensor parameter keeps its placements
    for out, emb in tied:  # to_empty of the embedding may have given it a new Parameter: one tensor again
        if out.weight is not emb.weight:
            out.weight = emb.weight


@torch.no_grad()
def materialise(root: nn.Module, device: torch.device) -> None:
    """Fill every ``meta`` parameter of ``root`` from the checkpoint of the :func:`meta_model` it belongs to.

    Call it after ``fully_shard`` (each rank reads its own rows) or on an unwrapped module (read whole).
    Parameters that are not on ``meta`` (e.g. an in-memory student, projections) are left alone.

    Args:
        root: the module to fill (e.g. the run's ``DistillModule``).
        device: where the parameters live (``cpu`` with gloo, the rank's GPU with NCCL).
    Raises:
        ValueError: a NaN/inf weight in the files (on every rank), a meta parameter that no
            :func:`meta_model` owns, a tensor the checkpoint lacks.
    """
    import torch.distributed as dist

    metas = {name for name, p in root.named_parameters() if p.is_meta}
    if not metas:
        return
    sources = _sources(root)
    _allocate(root, device)
    bad = ""
    for name, p in root.named_parameters():  # each tied tensor once
        if name not in metas:
            continue
        reader, key = _owner(name, sources)
        if key not in reader.files:
            raise ValueError(f"{reader.path} has no tensor {key}; the checkpoint does not match its config")
        local, start = _rows(p)
        if local.numel() == 0:  # this rank owns no row of it
            continue
        t = reader.read(key, start, start + local.shape[0]) if local.dim() else reader.read(key)
        if t.is_floating_point() and not _all_finite(t) and not bad:
            bad = f"the checkpoint's weight {key} ({reader.path}) holds NaN/inf values; the checkpoint is corrupt"
        local.copy_(t.reshape(local.shape))
        del t
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)  # every rank raises together, never one rank left in a collective
    if flag.item():
        raise ValueError(bad or "another rank found NaN/inf values in its shard of a checkpoint (see its error); "
                         "the checkpoint is corrupt or overflowed")


def check_meta_teacher_padding(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a ``meta`` teacher whose extra vocabulary rows (beyond the student's) are not all zero.

    The in-memory check runs the teacher on a batch to measure the probability on those ids, which a
    ``meta`` teacher cannot; all-zero rows are padding by construction (read from the file, a few rows).
    """
    vs, vt = int(lm_head_params(student)[0].shape[0]), int(lm_head_params(teacher)[0].shape[0])
    if vt <= vs:
        return
    reader = getattr(teacher, SOURCE_ATTR)
    head = lm_head_params(teacher)[0]
    names = [n for n, p in teacher.named_parameters(remove_duplicate=False) if p is head]  # tied: embedding too
    key = next((n for n in names if n in reader.files), None)
    if key is None or bool((reader.read(key, vs, vt) != 0).any()):
        raise ValueError(f"the teacher's lm_head has {vt} rows, the student's {vs}, and the extra rows are not all "
                         "zero; whether they are real tokens is measured with a teacher forward, which sharded loading "
                         "cannot run before training: pass the teacher loaded in memory (minitron.load_model), or "
                         "a student with the teacher's vocabulary")

