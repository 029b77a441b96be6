"""Input checks of a distillation run: model limits, shared vocabulary, the run's input directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from minitron.adapters import lm_head_params
from minitron.distillation.config import DistillConfig


def embed_rows(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_models(student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig) -> None:
    for name, m in (("student", student), ("teacher", teacher)):
        if m is None:  # an offline teacher (a cache of its logits)
            continue
        mpe = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if mpe is not None and cfg.seq_len is not None and cfg.seq_len > mpe:
            raise ValueError(
                f"seq_len={cfg.seq_len} exceeds the {name}'s max_position_embeddings={mpe}; "
                f"lower DistillConfig.seq_len to at most {mpe}"
            )
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(getattr(m, "config", None), attr, None) not in (None, 1.0):
                raise ValueError(
                    f"the {name} config sets {attr}; logits = hidden @ lm_head.T is assumed, which this model breaks"
                )


def check_vocab(student: nn.Module, teacher: nn.Module, tokenizer: Any, teacher_tokenizer: Any,
                 blocks: Sequence[torch.Tensor]) -> None:
    vs, vt = int(lm_head_params(student)[0].shape[0]), int(lm_head_params(teacher)[0].shape[0])
    if tokenizer is not None and teacher_tokenizer is not None and tokenizer is not teacher_tokenizer:
        a, b = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        diff = sum(1 for tok, i in a.items() if b.get(tok) != i) + sum(1 for tok in b if tok not in a)
        if diff:
            raise ValueError(
                f"student and teacher tokenizers differ ({diff} tokens missing or mapped to other ids; sizes "
                f"{len(a)} vs {len(b)}); logit distillation needs one shared vocabulary (extra rows only as padding). "
                "Distill a student that uses the teacher's tokenizer (e.g. one pruned from the teacher)."
            )
    if tokenizer is not None and len(tokenizer) > min(vs, vt):
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the student/teacher lm_heads have {vs}/{vt} rows; "
            "the vocabularies cannot be reconciled by padding. Use the tokenizer the models were trained with."
        )
    limit = min(embed_rows(student), embed_rows(teacher), vs, vt)
    for b in blocks:
        if b.numel() and (int(b.max()) >= limit or int(b.min()) < 0):
            raise ValueError(
                f"data holds token id {int(b.max())} (min {int(b.min())}) but the student/teacher vocabularies have "
                f"{vs}/{vt} entries (usable ids 0..{limit - 1}); the data was tokenised with a different tokenizer "
                "or the vocabularies differ beyond padding"
            )


def local_dir(obj: Any) -> str | None:
    """The local directory a model/tokenizer was loaded from, if any (an input the output must avoid)."""
    config = getattr(obj, "config", None)
    path = getattr(config, "_name_or_path", None) or getattr(obj, "name_or_path", None)
    return path if isinstance(path, str) and path and Path(path).is_dir() else None
