"""Prune checkpoints larger than memory: layer-streamed calibration and checkpoint-streamed surgery.

- :mod:`.checkpoint`: lazy safetensors reads (tensor or row range) and the ``meta`` skeleton;
- :mod:`.calibrate`: importance statistics with one decoder layer in memory;
- :mod:`.depth`: the layer-drop losses (``ppl`` depth criterion), each layer read once;
- :mod:`.write`: the in-memory path's plan applied row chunk by row chunk into safetensors shards;
- :mod:`.prune`: :func:`prune_checkpoint`, the whole path with the output-folder rules.
"""

from .calibrate import expected_peak_bytes, streamed_importance
from .checkpoint import CheckpointReader, skeleton
from .prune import prune_checkpoint

__all__ = ["CheckpointReader", "expected_peak_bytes", "prune_checkpoint", "skeleton", "streamed_importance"]
