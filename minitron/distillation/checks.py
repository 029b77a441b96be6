"""Input checks of a distillation run: model limits, shared vocabulary, the run's input directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from minitron.adapters import lm_head_params
from minitron.distillation.config import DistillConfig
from minitron.validate import check_finite_weights


def embed_rows(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def check_models(student: nn.Module, teacher: nn.Module | None, cfg: DistillConfig) -> None:
    """Raise a one-line ValueError before any data is read if the models cannot be distilled.

    The student must be another model than the teacher (sharing no parameter: the teacher is
    frozen), both must hold finite weights, a student with more vocabulary rows than the teacher
    cannot be trained with reverse KL (infinite), ``seq_len`` must fit their positions and the
    logits must be ``hidden @ lm_head.T``. ``teacher=None`` (an offline teacher: a cache of its logits)
    checks the student alone.
    """
    if teacher is None:
        _check_finite(student, "student")
    else:
        _check_teacher(student, teacher, cfg)
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


def _check_finite(model: nn.Module, name: str) -> None:
    """NaN/inf weights refused; a ``meta`` model (sharded loading) is checked as its rows are read instead."""
    if not any(p.is_meta for p in model.parameters()):
        check_finite_weights(model, name)


def _check_teacher(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
    shared = {id(p) for p in teacher.parameters()}.intersection(id(p) for p in student.parameters())
    if student is teacher or shared:
        same = "the same model" if student is teacher else f"models sharing {len(shared)} parameter tensor(s)"
        raise ValueError(f"the student and the teacher are {same}; the teacher is frozen, so pass a separate student "
                         "(a pruned model, or copy.deepcopy(teacher))")
    for name, m in (("teacher", teacher), ("student", student)):
        _check_finite(m, name)
    vs, vt = int(lm_head_params(student)[0].shape[0]), int(lm_head_params(teacher)[0].shape[0])
    reverse = cfg.logits_loss == "reverse_kl" or (cfg.logits_loss == "jsd" and cfg.jsd_beta == 1)
    if vs > vt and reverse and cfg.kd_weight > 0:  # the teacher is padded with -inf logits up to vs
        raise ValueError(
            f"logits_loss={cfg.logits_loss!r}{' with jsd_beta=1' if cfg.logits_loss == 'jsd' else ''} is infinite "
            f"here: the student's lm_head has {vs} rows, the teacher's {vt}, and any student probability on ids >= "
            f"{vt} (which the teacher cannot produce) makes KL(student || teacher) infinite; use forward_kl or jsd "
            f"with jsd_beta < 1, or cut the student's vocabulary to the teacher's (student.resize_token_embeddings({vt}))")


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
