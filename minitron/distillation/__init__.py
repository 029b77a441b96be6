"""Knowledge distillation of Hugging Face causal LMs (Minitron recipe, METHOD.md section 4).

Example:
    >>> from minitron.distillation import distill, DistillConfig
    >>> student = distill(student, teacher, texts, tokenizer=tok,
    ...                   config=DistillConfig(steps=1000, seq_len=1024, batch_size=8, output_dir="run/"))
"""

from minitron.distillation.config import DistillConfig
from minitron.distillation.losses import (
    IntermediateProjections,
    dynamic_alpha,
    intermediate_state_loss,
    linear_cross_entropy,
)
from minitron.distillation.trainer import NonFiniteLossError, distill

__all__ = [
    "DistillConfig",
    "IntermediateProjections",
    "NonFiniteLossError",
    "distill",
    "dynamic_alpha",
    "intermediate_state_loss",
    "linear_cross_entropy",
]
