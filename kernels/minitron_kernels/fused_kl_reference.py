"""Old home of the KD chunk reference; it lives beside the rest of the op in :mod:`minitron.losses.kd.reference`."""

from minitron.losses.kd.reference import (FORWARD_KL, JSD, REVERSE_KL, kd_chunk_reference, loss_kind,  # noqa: F401
                                          topk_mask_)
