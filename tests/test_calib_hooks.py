"""The importance reference (the chunked CPU path the calibration hooks run, and the ground truth of the
Triton kernels) and the batched hooks equal the plain formulas, however their chunks fall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minitron
from minitron.adapters import get_adapter
import minitron_kernels.importance_reference as ref_mod
from minitron.adapters import layer_io
from minitron.importance.hooks import CalibrationHooks
from minitron_kernels.importance_reference import (Scratch, accumulate_reference, block_importance_reference,
                                                   row_dot, seq_aggregate_into)
from tests.helpers import make_model


def sequence_aggregate(act: torch.Tensor, seq_agg: str) -> torch.Tensor:
    """The plain formula (B, S, D) -> (B, D) in the input's precision: the oracle of the chunked reference."""
    if seq_agg == "mean":
        return act.abs().mean(dim=1)
    if seq_agg == "l2":
        return act.square().sum(dim=1).sqrt()
    return act.var(dim=1, unbiased=False)

# chunk budgets: one row per chunk (a sample split along S), two samples per chunk, everything at once
CHUNKS = [4, 2 * 16 * 48 * 4, 1 << 20]


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seq_aggregate_into_matches_reference(monkeypatch, chunk, seq_agg, dtype):
    monkeypatch.setattr(ref_mod, "CHUNK_BYTES", chunk)
    act = torch.randn(5, 16, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = torch.full((5, 48), float("nan"))
    seq_aggregate_into(out, act, seq_agg, Scratch())
    post = {"mean": lambda x: x / 16, "l2": torch.sqrt, "var": lambda x: x}[seq_agg]  # what end_batch applies
    torch.testing.assert_close(post(out), sequence_aggregate(act.double(), seq_agg).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_row_dot(monkeypatch, chunk):
    monkeypatch.setattr(ref_mod, "CHUNK_BYTES", chunk)
    a, b = torch.randn(37, 48), torch.randn(37, 48)
    torch.testing.assert_close(row_dot(a, b, Scratch()), (a.double() * b.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)
    ab, bb = a.bfloat16(), b.bfloat16()
    torch.testing.assert_close(row_dot(ab, bb, Scratch()), (ab.double() * bb.double()).sum(-1).float(), rtol=1e-5, atol=1e-5)


# odd shapes; per dtype the reference reads the activation in its own dtype and sums in fp32, so against a
# float64 oracle of the same (rounded) values it is off by fp32 summation order only
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6)}


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("shape", [(3, 7, 37), (1, 1, 5), (2, 130, 33), (7, 37)])
def test_accumulate_reference_equals_the_plain_formula(monkeypatch, chunk, seq_agg, dtype, shape):
    """accumulate_reference (what runs on CPU, what the kernels are tested against) = the formula, over
    several calls, 2-D input included."""
    monkeypatch.setattr(ref_mod, "CHUNK_BYTES", chunk)
    d = shape[-1]
    sx, sx2 = torch.zeros(d), torch.zeros(d)
    want_x, want_x2 = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    for call in range(3):
        act = (torch.randn(*shape, generator=torch.Generator().manual_seed(call)) * 2 + 1).to(dtype)
        accumulate_reference(sx, sx2, act, seq_agg)
        x = sequence_aggregate(act.double().reshape(-1, *shape[-2:]), seq_agg)  # (B, D)
        want_x += x.sum(0)
        want_x2 += x.square().sum(0)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(sx, want_x.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(sx2, want_x2.float(), rtol=rtol, atol=atol)
    with pytest.raises(ValueError, match="unknown seq_agg='max'; allowed values: mean, l2, var"):
        accumulate_reference(sx, sx2, act, "max")


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_importance_reference_equals_cosine_similarity(monkeypatch, chunk, dtype):
    monkeypatch.setattr(ref_mod, "CHUNK_BYTES", chunk)
    g = torch.Generator().manual_seed(1)
    h_in, h_out = torch.randn(3, 11, 37, generator=g).to(dtype), torch.randn(3, 11, 37, generator=g).to(dtype)
    h_out[0, 0] = 0  # a zero row: the eps clamp, as F.cosine_similarity
    acc = torch.ones(1)
    block_importance_reference(acc, h_in, h_out)
    want = F.cosine_similarity(h_in.double().reshape(-1, 37), h_out.double().reshape(-1, 37), dim=-1).sum()
    torch.testing.assert_close(acc, (1 + want).float().reshape(1), rtol=1e-5, atol=1e-5)


def test_collect_is_independent_of_the_chunking(monkeypatch, calib_ids):
    model = make_model("qwen3")
    cfg = minitron.ImportanceConfig(batch_size=4)
    ref = minitron.collect_importance(model, calib_ids, cfg, progress=False)
    monkeypatch.setattr(ref_mod, "CHUNK_BYTES", 4)
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
    expected = torch.cat([sequence_aggregate(a.float(), "mean") for a in captured])  # (4, f)
    torch.testing.assert_close(sums["mlp.2"][0], expected.sum(0))
    torch.testing.assert_close(sums["mlp.2"][1], expected.square().sum(0))
    assert hooks.counts["mlp.2"] == 4 and hooks.counts["mlp.1"] == 0
    assert all(float(sx.abs().sum()) == 0 for site, (sx, _) in sums.items() if site != "mlp.2")
    assert len(mlp.down_proj._forward_pre_hooks) == 0  # the context manager removed its hooks


def test_block_importance_reuses_the_previous_output_norm(calib_ids):
    """The cosine of every layer matches F.cosine_similarity, with the norm cache in play."""
    model = make_model("mistral")
    acts = []
    handles = [layer.register_forward_hook(lambda m, a, kw, o: acts.append(layer_io(a, kw, o)), with_kwargs=True)
               for layer in model.model.layers]
    with torch.no_grad(), CalibrationHooks(model, get_adapter(model), "mean") as hooks:
        model.model(input_ids=calib_ids, use_cache=False)
        hooks.end_batch()
    for h in handles:
        h.remove()
    assert acts[1][0] is acts[0][1]  # what the cache relies on: layer l+1's input is layer l's output
    expected = torch.stack([F.cosine_similarity(i.double(), o.double(), dim=-1).sum() for i, o in acts]).float()
    torch.testing.assert_close(hooks.bi_cos_sum, expected, rtol=1e-5, atol=1e-4)
