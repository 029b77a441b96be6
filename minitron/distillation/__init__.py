"""Knowledge distillation of Hugging Face causal LMs (Minitron recipe, docs/method.md section 4).

Example:
    >>> from minitron.distillation import distill, DistillConfig
    >>> student = distill(student, teacher, texts, tokenizer=tok,
    ...                   config=DistillConfig(steps=1000, seq_len=1024, batch_size=8, output_dir="run/"))
"""

from minitron.distillation.config import DistillConfig
from minitron.distillation.sharded_load import meta_model
from minitron.distillation.teacher_cache import TeacherCache, cache_teacher_logits
from minitron.distillation.trainer import NonFiniteLossError, Trainer, distill
from minitron.losses.cross_entropy import linear_cross_entropy
from minitron.losses.intermediate import IntermediateProjections, dynamic_alpha, intermediate_state_loss

__all__ = [
    "DistillConfig",
    "IntermediateProjections",
    "NonFiniteLossError",
    "TeacherCache",
    "Trainer",
    "cache_teacher_logits",
    "distill",
    "dynamic_alpha",
    "intermediate_state_loss",
    "linear_cross_entropy",
    "meta_model",
]
