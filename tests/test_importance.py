"""Importance statistics equal a straightforward computation from captured activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minitron
from minitron.importance.aggregate import finalize
from tests.helpers import make_model, randomize_


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
    torch.testing.assert_close(scores.heads(metric="input"), expected_heads, rtol=1e-4, atol=1e-6)
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


# ---- attention heads: the scores against an attention computed by hand ------------------------


def smollm_like_attention_model() -> torch.nn.Module:
    """SmolLM2's attention layout at toy width: 9 query heads in 3 KV groups, head_dim 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=101, hidden_size=72, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return randomize_(LlamaForCausalLM(config))


def manual_head_outputs(layer, h_in: torch.Tensor, theta: float, eps: float) -> torch.Tensor:
    """Per-head attention outputs (B, S, 9, 64) of one Llama layer, from its weights only.

    q_proj rows h*64:(h+1)*64 are query head h; k/v_proj rows g*64:(g+1)*64 are KV head g;
    query head h reads KV head h // 3 (3 query heads per group, consecutive).
    """
    x = h_in.double()
    x = layer.input_layernorm.weight.double() * x / x.square().mean(-1, keepdim=True).add(eps).sqrt()  # RMSNorm
    B, S, _ = x.shape
    q = (x @ layer.self_attn.q_proj.weight.double().T).view(B, S, 9, 64)
    k = (x @ layer.self_attn.k_proj.weight.double().T).view(B, S, 3, 64)
    v = (x @ layer.self_attn.v_proj.weight.double().T).view(B, S, 3, 64)
    inv_freq = 1.0 / theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    angles = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq  # (S, 32)
    cos, sin = angles.cos(), angles.sin()

    def rope(t):  # rotate the pairs (i, i + 32) of every head
        a, b = t[..., :32], t[..., 32:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    q, k = rope(q), rope(k)
    out = torch.empty(B, S, 9, 64, dtype=torch.float64)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for h in range(9):
        g = h // 3
        logits = torch.einsum("bsd,btd->bst", q[:, :, h], k[:, :, g]) / 8.0  # 1 / sqrt(64)
        probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[:, :, h] = probs @ v[:, :, g]
    return out


def test_head_scores_match_attention_computed_by_hand(calib_ids):
    """`input` is the paper's criterion and `output` the contribution after o_proj, both recomputed
    from q/k/v/o weights with the head-to-group mapping and row layout written out by hand."""
    model = smollm_like_attention_model()
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=4, head_output=True), progress=False)
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0] if a else kw["hidden_states"]),
                                               with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for h in handles:
        h.remove()
    theta, eps = model.config.rope_parameters["rope_theta"], model.config.rms_norm_eps
    for l, layer in enumerate(model.model.layers):
        a = manual_head_outputs(layer, inputs[l], theta, eps)  # (N, S, 9, 64)
        # paper: per channel, sequence mean of |a| then L2 over the batch; then L2 over head_dim
        channel = a.abs().mean(dim=1).square().sum(dim=0).sqrt()  # (9, 64)
        torch.testing.assert_close(scores.heads(metric="input")[l], channel.norm(dim=-1).float(), rtol=1e-4, atol=1e-6)
        # output: y_h = W_o[:, h*64:(h+1)*64] @ a_h per token, its norm, sequence mean, batch L2
        w_o = layer.self_attn.o_proj.weight.double().view(72, 9, 64)
        y = torch.einsum("dhi,bshi->bshd", w_o, a).norm(dim=-1)  # (N, S, 9)
        expected = y.mean(dim=1).square().sum(dim=0).sqrt()
        torch.testing.assert_close(scores.heads(metric="output")[l], expected.float(), rtol=1e-4, atol=1e-6)


def test_head_loss_equals_loss_with_the_head_masked(calib_ids):
    model = make_model("qwen2")  # 6 heads, 2 KV groups, biases on q/k/v
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(head_loss=True, head_loss_blocks=6,
                                                                                     batch_size=4), progress=False)
    assert scores.heads(metric="loss").shape == (4, 6)
    for l, h in ((0, 0), (1, 4), (3, 5)):
        mask = torch.ones(48)
        mask[h * 8 : (h + 1) * 8] = 0.0
        handle = model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(lambda m, a: (a[0] * mask,))
        try:
            expected = minitron.lm_loss(model, calib_ids[:6], batch_size=6)
        finally:
            handle.remove()
        assert scores.heads(metric="loss")[l, h].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="head_loss=True"):
        minitron.collect_importance(model, calib_ids, progress=False).heads(metric="loss")
    with pytest.raises(ValueError, match="unknown head_metric='median'"):
        scores.heads(metric="median")


def test_norm_input_statistics_match_direct_formula(calib_ids):
    model = make_model("llama")
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=3), progress=False)
    inputs: dict[str, list[torch.Tensor]] = {}
    norms = {f"norm.{l}.{k}": getattr(layer, name) for l, layer in enumerate(model.model.layers)
             for k, name in enumerate(("input_layernorm", "post_attention_layernorm"))}
    norms["norm.final"] = model.model.norm
    handles = [m.register_forward_pre_hook(lambda mod, a, s=s: inputs.setdefault(s, []).append(a[0])) for s, m in norms.items()]
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for h in handles:
        h.remove()
    assert set(scores.norm_ms) == set(norms)
    for site, xs in inputs.items():
        x = torch.cat(xs).double().reshape(-1, 48)  # every calibration token
        expected = (x.square() / (x.square().mean(-1, keepdim=True) + model.config.rms_norm_eps)).mean(0)
        torch.testing.assert_close(scores.norm_ms[site], expected.float(), rtol=1e-5, atol=1e-6)
    # LayerNorm families have nothing to rescale
    assert minitron.collect_importance(make_model("starcoder2"), calib_ids, progress=False).norm_ms == {}


def test_sink_tokens_drop_leading_positions(calib_ids):
    model = make_model("llama")
    skipped = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(sink_tokens=3), progress=False)
    cut = minitron.collect_importance(model, calib_ids, progress=False)
    assert not torch.allclose(skipped.mlp(), cut.mlp())
    # with seq_agg=mean, excluding the first 3 positions equals the statistics of the activations
    # from position 3 on: check on the first layer's norm output, computed directly
    acts = capture(model, calib_ids)["norm.0.0"]
    a = torch.cat(acts)[:, 3:].double()
    torch.testing.assert_close(skipped.site_scores("norm.0.0"), a.abs().mean(1).square().sum(0).sqrt().float(),
                               rtol=1e-5, atol=1e-6)


def test_greedy_layer_removal_equals_rescoring_by_hand(calib_ids):
    from minitron.importance.ablation import layer_drop_losses
    from minitron.importance.ablation import greedy_layer_removal

    model = make_model("qwen3")
    one_shot = layer_drop_losses(model, calib_ids, batch_size=5)
    assert greedy_layer_removal(model, calib_ids, drop=2, step=2, batch_size=5) == one_shot.argsort()[:2].tolist()
    kept, expected = [0, 1, 2, 3], []
    for _ in range(2):  # drop each remaining layer from the shrunk model, remove the least harmful
        losses = {l: minitron.lm_loss(minitron.apply_plan(model, minitron.PrunePlan(
            layers=torch.tensor([k for k in kept if k != l]))), calib_ids) for l in kept}
        worst = min(losses, key=losses.get)
        expected.append(worst)
        kept.remove(worst)
    assert greedy_layer_removal(model, calib_ids, drop=2, step=1, batch_size=5) == expected


def test_prune_depth_rounds_keeps_the_layers_iterative_removal_keeps(calib_ids):
    from minitron.importance.ablation import greedy_layer_removal

    model = make_model("llama", seed=1)
    removed = greedy_layer_removal(model, calib_ids, drop=2, step=1, batch_size=4)
    assert sorted(removed) != sorted(greedy_layer_removal(model, calib_ids, drop=2, step=2, batch_size=4))  # has teeth
    config = minitron.ImportanceConfig(batch_size=4)
    pruned = minitron.prune(model, calib_ids, minitron.Target(num_hidden_layers=2), seq_len=16, importance=config,
                            depth_rounds=2, verbose=False, progress=False)
    kept = sorted(set(range(4)) - set(removed))
    assert pruned.config.num_hidden_layers == 2
    for new, old in enumerate(kept):  # the pruned model's layers are the original kept ones
        torch.testing.assert_close(pruned.model.layers[new].mlp.up_proj.weight, model.model.layers[old].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="depth_rounds"):
        minitron.prune(model, calib_ids, minitron.Target(num_hidden_layers=2), depth_rounds=2, depth_metric="bi",
                       verbose=False)
