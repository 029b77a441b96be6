"""Old home of the drop-in KD loss; it lives in :mod:`minitron.losses.kd.module` (names kept here)."""

from minitron.losses.kd.module import LinearKDLoss, fused_linear_kd_loss, shared_vocab_head  # noqa: F401

__all__ = ["LinearKDLoss", "fused_linear_kd_loss", "shared_vocab_head"]
