"""minitron.heap (giving the C heap's free pages back) and where prune() / lm_loss rely on it."""

from __future__ import annotations

import pytest
import torch

import minitron
import minitron.evaluation as evaluation
import minitron.heap as heap
from tests.helpers import make_model

GLIBC = heap._malloc_trim() is not None


def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return -1


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_trim_heap_returns_freed_heap_holes():
    # one freed 24 MiB block raises glibc's mmap threshold: the 1 MiB blocks below then come from the heap
    big = torch.ones(24 << 18)
    del big
    blocks = [torch.ones(1 << 18) for _ in range(40)]  # 40 x 1 MiB, touched
    keep = blocks[-1]  # pins the top of the heap: freeing the rest leaves holes free() cannot shrink
    del blocks
    before = _rss_anon_kb()
    assert heap.trim_heap() is True
    assert before - _rss_anon_kb() > 16 << 10  # most of the ~39 MiB of holes left the process
    assert float(keep.sum()) == 1 << 18  # live memory untouched


def test_trim_heap_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_TRIM", [None])
    assert heap.trim_heap() is False
    model = make_model("llama")
    with heap.trimmed_layers(model.model.layers):  # installs nothing
        assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_prune_trims_before_every_layer_and_leaves_no_hook(calib_ids, monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_TRIM", [lambda pad: calls.append(pad) or 1])
    model = make_model("llama")
    n_layers = model.config.num_hidden_layers
    reference = minitron.prune(make_model("llama"), calib_ids, params=0.7, seq_len=16, progress=False, verbose=False)
    calls.clear()
    pruned = minitron.prune(model, calib_ids, params=0.7, seq_len=16, inplace=True, progress=False, verbose=False)
    # calibration + every candidate's scoring run all layers: at least one trim per layer forward
    assert len(calls) >= 2 * n_layers
    assert all(not layer._forward_pre_hooks for layer in pruned.model.layers)
    ids = calib_ids[:2]
    torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_lm_loss_over_many_vocabulary_tiles_equals_full_logits(calib_ids, monkeypatch):
    model = make_model("llama").eval()
    with torch.no_grad():
        logits = model(calib_ids).logits.float()
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 calib_ids[:, 1:].reshape(-1)).item()
    monkeypatch.setattr(evaluation, "EVAL_TILE_BYTES", 1024)  # a few vocabulary rows per tile
    assert evaluation.lm_loss(model, calib_ids, batch_size=4) == pytest.approx(expected, rel=1e-5)
