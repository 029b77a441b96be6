"""Lazy, row-ranged reads of a safetensors checkpoint folder, and its ``meta`` model skeleton.

:class:`CheckpointReader` maps every tensor name of a Hugging Face checkpoint folder
(``model.safetensors`` or ``model.safetensors.index.json`` + shards) to its shard, and reads one
tensor, or a range of its rows, at a time with ``safetensors.safe_open`` (the shard is opened for
the read and closed after it, so none of the file stays mapped into the process). Nothing is
unpickled: only safetensors and JSON are read. :func:`skeleton` builds the model on ``meta``
(buffers real: rotary tables, embedding scales) and checks that the checkpoint's tensor names and
shapes are the model's own (transformers renames or fuses some tensors at load time, e.g. MoE
experts: those checkpoints are refused with one line).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters import get_adapter, moe_spec_of
from ..validate import _all_finite

__all__ = ["CheckpointReader", "load_module_", "release_module_", "skeleton"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
    """Tensor-by-tensor access to a safetensors checkpoint folder.

    Args:
        path: the checkpoint folder (``config.json`` + safetensors weights).
    Attributes:
        files: tensor name -> shard path.
        bytes_read: bytes of tensor data read so far (each weight once per pass).
    Raises:
        ValueError: no such folder, no ``config.json``, no safetensors weights (``.bin`` checkpoints are
            never unpickled), or an index naming a missing shard.
    Example:
        >>> r = CheckpointReader("ckpt/")
        >>> r.read("model.layers.0.mlp.down_proj.weight", 0, 16).shape  # its first 16 rows
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise ValueError(f"{path} is not a checkpoint folder (no config.json); pass the folder a model was "
                             "saved to with save_pretrained")
        if (self.path / INDEX).is_file():
            try:
                weight_map = json.loads((self.path / INDEX).read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path / INDEX} is not a readable safetensors index ({e}); re-save the "
                                 "checkpoint with save_pretrained") from None
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif (self.path / SINGLE).is_file():
            with _opened(self.path / SINGLE) as f:
                self.files = {name: self.path / SINGLE for name in f.keys()}
        else:
            raise ValueError(f"{path} holds no safetensors weights ({SINGLE} or {INDEX}); minitron streams only "
                             "safetensors checkpoints (re-save with save_pretrained(..., safe_serialization=True))")
        missing = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing:
            raise ValueError(f"the checkpoint index of {path} names missing shard {missing[0]}; the checkpoint is "
                             "incomplete (copy it again)")
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for file in sorted(set(self.files.values())):
            with _opened(file) as f:
                for name in f.keys():
                    if self.files.get(name) == file:
                        s = f.get_slice(name)
                        self._meta[name] = (_DTYPES[s.get_dtype()], tuple(s.get_shape()))
        self.bytes_read = 0

    def names(self) -> list[str]:
        """Tensor names, shard by shard in file order (each shard read front to back)."""
        return sorted(self._meta, key=lambda n: (str(self.files[n]), n))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][0]

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self.dtype(name).itemsize

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``start:stop`` of its first dimension when given), in its stored dtype.

        The shard is opened for this read only: the returned tensor is private memory, no file
        page stays mapped.
        """
        with _opened(self.files[name]) as f:
            if start is None and stop is None:
                t = f.get_tensor(name)
            else:
                t = f.get_slice(name)[start:stop]
        self.bytes_read += t.numel() * t.element_size()
        return t


@contextmanager
def _opened(file: Path) -> Iterator[Any]:
    """``safe_open(file)``; a corrupt or truncated file raises one line naming it."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: name the file
        raise ValueError(f"{file} is corrupt or truncated ({e}); copy the checkpoint again") from None
    with handle as f:
        yield f


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def skeleton(path: str | os.PathLike, dtype: torch.dtype | None, reader: CheckpointReader) -> nn.Module:
    """The model of checkpoint ``path`` with every parameter on ``meta`` (buffers real), checked against it.

    Args:
        path: the checkpoint folder.
        dtype: compute dtype of the skeleton (``None``: the config's ``dtype``, else float32).
        reader: the folder's :class:`CheckpointReader`.
    Returns:
        A ``*ForCausalLM`` whose parameters are ``meta`` tensors of the checkpoint's names and shapes.
    Raises:
        ValueError: unsupported family, a mixture-of-experts checkpoint (experts stored per expert,
            fused by transformers at load time), or tensor names / shapes that differ from the model's.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..local import from_pretrained

    config = from_pretrained(AutoConfig, path, "--model")  # local-only, offline, never the checkpoint's own code
    if moe_spec_of(config) is not None:
        raise ValueError(f"{path}: mixture-of-experts checkpoints ({config.model_type}) store each expert separately "
                         "and transformers fuses them at load time, which the streamed path does not reproduce; load "
                         "the model and use minitron.prune(model, ..., inplace=True) (CLI: minitron prune --inplace)")
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_empty_weights re-creates each registered parameter: ties are made again here
    get_adapter(model)  # unsupported families: one line listing the supported ones
    model.eval()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    optional = {k for k in expected if tied and k.startswith("lm_head.")}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(k for k in expected if k in params and k not in reader._meta and k not in optional)
    extra = sorted(k for k in reader._meta if k not in expected)
    wrong = sorted(k for k in reader._meta if k in expected and tuple(reader.shape(k)) != expected[k])
    if missing or extra or wrong:
        what = (f"missing {missing[:2]}" if missing else "") + (f" unexpected {extra[:2]}" if extra else "") + \
            (f" shape of {wrong[0]} {reader.shape(wrong[0])} != {expected[wrong[0]]}" if wrong else "")
        raise ValueError(f"{path}: the checkpoint's tensors are not the {type(model).__name__} state dict "
                         f"({what.strip()}); transformers converts this layout at load time, which the streamed "
                         "path does not reproduce: load the model and use minitron.prune(model, ..., inplace=True)")
    return model


def load_module_(module: nn.Module, prefix: str, reader: CheckpointReader, device: torch.device,
                 dtype: torch.dtype) -> None:
    """Materialise every parameter of ``module`` (state-dict prefix ``prefix``) from the checkpoint.

    Each tensor is read once, checked finite (a corrupt or overflowed checkpoint raises one line
    naming the weight) and cast to ``dtype`` on ``device``.
    """
    for name, param in list(module.named_parameters()):
        key = prefix + name
        if key not in reader.files:
            continue
        t = reader.read(key)
        if t.is_floating_point() and not _all_finite(t):
            raise ValueError(f"the checkpoint's weight {key} holds NaN/inf values; the checkpoint is corrupt or "
                             "overflowed")
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        target._parameters[attr] = nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)


def release_module_(module: nn.Module) -> None:
    """Put every parameter of ``module`` back on ``meta`` (its memory is freed once nothing else holds it)."""
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
