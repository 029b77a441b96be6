"""Block length when the user sets none: a (B, S) token-id tensor is B blocks of S tokens, and the default
never exceeds the model's ``max_position_embeddings``."""

from __future__ import annotations

import json

import pytest
import torch

import minitron
from minitron import pruner
from minitron.data import DEFAULT_SEQ_LEN, resolve_seq_len
from minitron.distillation import distill
from minitron.distillation.run_dir import RUN_FILE
from tests.helpers import V, make_model, quick_cfg, small_student, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Model:
    def __init__(self, mpe):
        self.config = type("C", (), {"max_position_embeddings": mpe})()


def test_resolve_seq_len_rules(tmp_path):
    ids = torch.zeros(8, 32, dtype=torch.long)
    assert resolve_seq_len(ids, None, [_Model(128)]) == 32  # the rows, as given
    assert resolve_seq_len(ids, 16, [_Model(128)]) == 16  # an explicit length re-packs
    assert resolve_seq_len(torch.zeros(100, dtype=torch.long), None, [_Model(4096)]) == DEFAULT_SEQ_LEN
    assert resolve_seq_len(["text"], None, [_Model(4096), _Model(100)]) == 100  # the smallest model's limit
    assert resolve_seq_len(["text"], None, [_Model(None)]) == DEFAULT_SEQ_LEN
    assert resolve_seq_len(["text"], None, []) == DEFAULT_SEQ_LEN
    torch.save(ids, tmp_path / "ids.pt")
    assert resolve_seq_len(tmp_path / "ids.pt", None, [_Model(128)]) == 32
    with pytest.raises(ValueError, match="32 tokens per row, more than the model's max_position_embeddings=16"):
        resolve_seq_len(ids, None, [_Model(16)])
    with pytest.raises(ValueError, match="--seq-len=64 exceeds the model's max_position_embeddings=16"):
        resolve_seq_len(ids, 64, [_Model(16)], flag="--seq-len")


def test_prune_uses_a_batch_of_token_ids_as_its_blocks(monkeypatch):
    model = make_model("llama")  # max_position_embeddings=64 < the old fixed default of 256
    seen = []
    real = pruner.collect_importance

    def spy(model, blocks, *args, **kwargs):
        seen.append(tuple(blocks.shape))
        return real(model, blocks, *args, **kwargs)

    monkeypatch.setattr(pruner, "collect_importance", spy)
    ids = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(0))
    small = minitron.prune(model, ids, minitron.Target(intermediate_size=64), progress=False, verbose=False)
    assert seen == [(8, 32)]
    assert small.config.intermediate_size == 64


def test_prune_default_length_fits_the_model(monkeypatch):
    model = make_model("llama")
    seen = []
    real = pruner.collect_importance
    monkeypatch.setattr(pruner, "collect_importance",
                        lambda m, blocks, *a, **k: seen.append(tuple(blocks.shape)) or real(m, blocks, *a, **k))
    stream = torch.randint(0, 101, (640,), generator=torch.Generator().manual_seed(0))  # 1-D: packed
    minitron.prune(model, stream, minitron.Target(intermediate_size=64), progress=False, verbose=False)
    assert seen == [(10, 64)]  # blocks of max_position_embeddings=64 tokens, not 256


def test_distill_uses_a_batch_of_token_ids_as_its_blocks(tmp_path):
    teacher = tiny(seed=0)
    ids = torch.randint(0, V, (16, 24), generator=torch.Generator().manual_seed(0))
    cfg = quick_cfg(tmp_path, steps=1, seq_len=None)
    assert cfg.seq_len is None
    distill(small_student(), teacher, ids, config=cfg)
    run = json.loads((tmp_path / RUN_FILE).read_text())
    assert run["config"]["seq_len"] == 24
    assert run["data"] == {**run["data"], "n_blocks": 16, "seq_len": 24}
