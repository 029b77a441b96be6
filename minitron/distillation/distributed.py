"""Process-group setup and collectives of a distillation run (single process, DDP, FSDP2).

:func:`setup` reads the ``torchrun`` environment (and initialises the process group there);
:func:`wrap` puts the one root module of the run under DDP or ``fully_shard`` and fills the parameters
of ``meta`` models (:mod:`minitron.distillation.sharded_load`: after ``fully_shard`` each rank reads only
its own rows). Every helper is a no-op in a single process, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from minitron.adapters import base_decoder
from minitron.distillation.config import DistillConfig
from minitron.distillation.sharded_load import materialise, on_meta  # noqa: F401 - on_meta: the trainer's test


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``mode`` (``none`` | ``ddp`` | ``fsdp``), rank, world size, device."""

    mode: str
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: DistillConfig) -> DistEnv:
    """The run's :class:`DistEnv`; initialises the process group under torchrun."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel != "none" and (dist.is_available() and (dist.is_initialized() or world_env > 1)):
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world == 1:
        mode = "fsdp" if cfg.parallel == "fsdp" and dist.is_initialized() else "none"
    else:
        mode = "fsdp" if cfg.parallel == "fsdp" else "ddp"
    return DistEnv(mode, rank, world, device)


def to_device(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, leaving ``meta`` tensors (of :func:`sharded_load.meta_model` models) on ``meta``.

    Those are given storage by :func:`wrap`, after sharding, so no rank ever holds them whole.
    """
    return module._apply(lambda t: t if t.is_meta else t.to(device))


def wrap(module: nn.Module, env: DistEnv, models: Sequence[nn.Module]) -> nn.Module:
    """``module`` under DDP or FSDP2 (decoder layers of ``models`` sharded first), or as is.

    Parameters still on ``meta`` (models built by :func:`sharded_load.meta_model`) are materialised
    here: under FSDP after ``fully_shard``, each rank reading only the rows it owns from the
    safetensors files; otherwise (one process, DDP) read whole before wrapping.
    """
    if env.mode != "fsdp":
        materialise(module, env.device)
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if env.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world,))
        for m in models:
            for layer in base_decoder(m).layers:
                fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        materialise(module, env.device)
    return module


def all_mean(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / world
    return t


def all_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, world: int) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict (gathers FSDP2 DTensor shards; a collective under FSDP)."""
    out = {}
    for k, v in module.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").clone()
    return out
