"""Old home of the naive KD reference; it lives in :mod:`minitron.losses.kd.naive` (names kept here)."""

from minitron.losses.kd.naive import (LOSSES, REDUCTIONS, divergence_from_logits, keep_mask,  # noqa: F401
                                      linear_kd_loss_naive, reduce_loss)
