"""The batched calibration hooks equal the plain formulas, however their chunks fall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minitron
from minitron.adapters import get_adapter
from minitron.importance import hooks as hooks_mod
from minitron.importance.aggregate import sequence_aggregate
from minitron.importance.hooks import CalibrationHooks, _Scratch, row_dot, seq_aggregate_into
from tests.helpers import make_model

# chunk budgets: one row per chunk (a sample split along S), two samples per chunk, everything at once
CHUNKS = [4, 2 * 16 * 48 * 4, 1 << 20]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seq_aggregate_into_matches_reference(monkeypatch, chunk, seq_agg, dtype):
    monkeypatch.setattr(hooks_mod, "CHUNK_BYTES", chunk)
    act = torch.randn(5, 16, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = torch.full((5, 48), float("nan"))
    seq_aggregate_into(out, act, seq_agg, _Scratch())
    post = {"mean": lambda x: x / 16, "l2": torch.sqrt, "var": lambda x: x}[seq_agg]  # what end_batch applies
    torch.testing.assert_close(post(out), sequence_aggregate(act.double(), seq_agg).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_row_dot(monkeypatch, chunk):
    monkeypatch.setattr(hooks_mod, "CHUNK_BYTES", chunk)
    a, b = torch.randn(37, 48), torch.randn(37, 48)
    torch.testing.assert_close(row_dot(a, b, _Scratch()), (a.double() * b.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)
    ab, bb = a.bfloat16(), b.bfloat16()
    torch.testing.assert_close(row_dot(ab, bb, _Scratch()), (ab.double() * bb.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)


def test_collect_is_independent_of_the_chunking(monkeypatch, calib_ids):
    model = make_model("qwen3")
    cfg = minitron.ImportanceConfig(batch_size=4)
    ref = minitron.collect_importance(model, calib_ids, cfg, progress=False)
    monkeypatch.setattr(hooks_mod, "CHUNK_BYTES", 4)
    tiny = minitron.collect_importance(model, calib_ids, cfg, progress=False)
    for site, (sx, sx2) in ref.sums.items():
        torch.testing.assert_close(tiny.sums[site][0], sx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tiny.sums[site][1], sx2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tiny.bi_cos_sum, ref.bi_cos_sum, rtol=1e-5, atol=1e-5)
    assert tiny.counts == ref.counts and tiny.bi_count == ref.bi_count == calib_ids.numel()


def test_sites_that_did_not_fire_are_left_alone():
    """A batch where only one module ran (e.g. another hook skipped the rest) updates that site only."""
    model = make_model("llama")
    mlp = model.model.layers[2].mlp
    x = torch.randn(3, 7, 48)
    captured = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad(), CalibrationHooks(model, get_adapter(model), "mean") as hooks:
        mlp(x)
        hooks.end_batch()
        mlp(x[:1])
        hooks.end_batch()
    handle.remove()
    sums = hooks.site_sums()
    expected = torch.cat([sequence_aggregate(a, "mean") for a in captured])  # (4, f)
    torch.testing.assert_close(sums["mlp.2"][0], expected.sum(0))
    torch.testing.assert_close(sums["mlp.2"][1], expected.square().sum(0))
    assert hooks.counts["mlp.2"] == 4 and hooks.counts["mlp.1"] == 0
    assert all(float(sx.abs().sum()) == 0 for site, (sx, _) in sums.items() if site != "mlp.2")
    assert len(mlp.down_proj._forward_pre_hooks) == 0  # the context manager removed its hooks


def test_block_importance_reuses_the_previous_output_norm(calib_ids):
    """The cosine of every layer matches F.cosine_similarity, with the norm cache in play."""
    model = make_model("mistral")
    acts = []
    handles = [layer.register_forward_hook(lambda m, a, kw, o: acts.append((a[0] if a else kw["hidden_states"], o)),
                                           with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad(), CalibrationHooks(model, get_adapter(model), "mean") as hooks:
        model.model(input_ids=calib_ids, use_cache=False)
        hooks.end_batch()
    for h in handles:
        h.remove()
    assert acts[1][0] is acts[0][1]  # what the cache relies on: layer l+1's input is layer l's output
    expected = torch.stack([F.cosine_similarity(i.double(), o.double(), dim=-1).sum() for i, o in acts]).float()
    torch.testing.assert_close(hooks.bi_cos_sum, expected, rtol=1e-5, atol=1e-4)
