"""Importance statistics equal a straightforward computation from captured activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minitron
from minitron.importance.aggregate import finalize
from tests.conftest import make_model


def capture(model, ids):
    """Full activations of every site, captured once (the naive, memory-hungry way)."""
    acts: dict[str, list[torch.Tensor]] = {}
    handles = []
    for l, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.c_proj
        handles.append(down.register_forward_pre_hook(lambda m, a, l=l: acts.setdefault(f"mlp.{l}", []).append(a[0])))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: acts.setdefault(f"attn.{l}", []).append(a[0])))
        for k, norm in enumerate((layer.input_layernorm, layer.post_attention_layernorm)):
            handles.append(norm.register_forward_hook(lambda m, a, o, l=l, k=k: acts.setdefault(f"norm.{l}.{k}", []).append(o)))
        handles.append(layer.register_forward_hook(
            lambda m, a, kw, o, l=l: acts.setdefault(f"io.{l}", []).append((a[0] if a else kw["hidden_states"], o)),
            with_kwargs=True))
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: acts.setdefault("norm.final", []).append(o)))
    with torch.no_grad():
        for start in range(0, ids.shape[0], 4):
            model(input_ids=ids[start : start + 4], use_cache=False)
    for h in handles:
        h.remove()
    return acts


@pytest.mark.parametrize("family", ["llama", "starcoder2"])
@pytest.mark.parametrize("batch_agg,seq_agg", [("l2", "mean"), ("mean", "mean"), ("var", "l2"), ("l2", "var")])
def test_scores_match_direct_formulas(family, batch_agg, seq_agg, calib_ids):
    model = make_model(family)
    cfg = minitron.ImportanceConfig(batch_agg=batch_agg, seq_agg=seq_agg, batch_size=4)
    scores = minitron.collect_importance(model, calib_ids, cfg, progress=False)
    acts = capture(model, calib_ids)

    def direct(site: str) -> torch.Tensor:
        a = torch.cat(acts[site]).double()  # (N, S, D), all calibration samples at once
        x = {"mean": a.abs().mean(1), "l2": a.square().sum(1).sqrt(), "var": a.var(1, unbiased=False)}[seq_agg]  # (N, D)
        return {"l2": x.square().sum(0).sqrt(), "mean": x.mean(0), "var": x.var(0, unbiased=False)}[batch_agg].float()

    L, H, hd = 4, 6, 8
    expected_mlp = torch.stack([direct(f"mlp.{l}") for l in range(L)])
    torch.testing.assert_close(scores.mlp(), expected_mlp, rtol=1e-4, atol=1e-6)
    expected_heads = torch.stack([direct(f"attn.{l}").view(H, hd).norm(dim=-1) for l in range(L)])
    torch.testing.assert_close(scores.heads(), expected_heads, rtol=1e-4, atol=1e-6)
    norm_sites = [f"norm.{l}.{k}" for l in range(L) for k in range(2)] + ["norm.final"]
    expected_hidden = sum(direct(s) for s in norm_sites)
    torch.testing.assert_close(scores.hidden(), expected_hidden, rtol=1e-4, atol=1e-6)

    expected_bi = []
    for l in range(L):
        cos = torch.cat([F.cosine_similarity(i.double(), o.double(), dim=-1).flatten() for i, o in acts[f"io.{l}"]])
        expected_bi.append(1 - cos.mean())
    torch.testing.assert_close(scores.depth("bi"), torch.stack(expected_bi).float(), rtol=1e-5, atol=1e-6)


def test_ppl_depth_scores_equal_manual_layer_removal(calib_ids):
    model = make_model("qwen3")
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(depth_ppl=True, batch_size=5), progress=False)
    for l in (0, 2):
        pruned = minitron.apply_plan(model, minitron.PrunePlan(layers=torch.tensor([i for i in range(4) if i != l])))
        assert scores.depth("ppl")[l].item() == pytest.approx(minitron.lm_loss(pruned, calib_ids), rel=1e-5)
    assert scores.base_loss == pytest.approx(minitron.lm_loss(model, calib_ids), rel=1e-6)


def test_streamed_accumulation_is_batching_invariant(calib_ids):
    """Memory is O(D) per site and results do not depend on how calibration is batched."""
    model = make_model("llama")
    a = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=1), progress=False)
    b = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=10), progress=False)
    for site in a.sums:
        assert a.sums[site][0].shape == b.sums[site][0].shape and a.sums[site][0].dim() == 1
        torch.testing.assert_close(a.site_scores(site), b.site_scores(site), rtol=1e-5, atol=1e-6)
    assert a.counts["mlp.0"] == 10


def test_finalize_formulas():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])  # two samples' sequence aggregates
    s1, s2 = x.sum(0), x.square().sum(0)
    torch.testing.assert_close(finalize(s1, s2, 2, "l2"), torch.tensor([10.0, 29.0]).sqrt())
    torch.testing.assert_close(finalize(s1, s2, 2, "mean"), torch.tensor([2.0, 3.5]))
    torch.testing.assert_close(finalize(s1, s2, 2, "var"), torch.tensor([1.0, 2.25]))
