"""The Minitron pipeline end to end: prune a teacher, distill the pruned student back from it."""

from __future__ import annotations

import torch

import minitron
from tests.helpers import quick_cfg, rows


def test_pruned_student_recovers_by_distillation(teacher_and_data, tmp_path):
    torch.set_num_threads(1)
    teacher, train, held_out = teacher_and_data
    student = minitron.prune(teacher, train[:64], minitron.Target(hidden_size=24, intermediate_size=32,
                                                                  num_attention_heads=2, num_hidden_layers=1),
                             seq_len=train.shape[1], progress=False, verbose=False)
    assert minitron.count_parameters(student) < 0.6 * minitron.count_parameters(teacher)
    cfg = quick_cfg(tmp_path, steps=40, batch_size=16, warmup_steps=4, eval_every=40)
    minitron.distill(student, teacher, train, eval_data=held_out, config=cfg)
    first, last = rows(tmp_path, "eval")[0], rows(tmp_path, "eval")[-1]
    assert (first["step"], last["step"]) == (0, 40)
    assert last["kl_to_teacher"] < 0.7 * first["kl_to_teacher"]
    assert last["lm_loss"] < first["lm_loss"] - 0.2
    # the teacher is never modified by pruning or distillation
    assert teacher.config.num_hidden_layers == 2 and teacher.model.embed_tokens.weight.shape[1] == 32
