"""The fused linear + KD loss op, in one place: reference, custom op, chunk loop, autograd, module.

See :mod:`minitron.losses.kd.api` for the layout; the public names are re-exported here and by
:mod:`minitron.losses`.
"""

from __future__ import annotations

from minitron.losses.kd.api import IMPLS, KD_CHUNK, check_impl_device, last_impl, linear_kd_loss
from minitron.losses.kd.chunked import default_chunk_size
from minitron.losses.kd.module import LinearKDLoss, fused_linear_kd_loss, shared_vocab_head
from minitron.losses.kd.naive import divergence_from_logits, linear_kd_loss_naive
from minitron.losses.kd.reference import kd_chunk_reference
from minitron.losses.kd.workspace import release_workspace

__all__ = ["IMPLS", "KD_CHUNK", "LinearKDLoss", "check_impl_device", "default_chunk_size", "divergence_from_logits",
           "fused_linear_kd_loss", "kd_chunk_reference", "last_impl", "linear_kd_loss", "linear_kd_loss_naive",
           "release_workspace", "shared_vocab_head"]
