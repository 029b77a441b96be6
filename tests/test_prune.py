"""Pruned models equal masked originals; checkpoints round-trip; the input model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import minitron
from minitron.adapters import get_adapter
from minitron.pruning import PrunePlan, Target, apply_plan, make_plan
from tests.helpers import assert_kv_cache_generation, make_model

ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def scores_for(model, ids):
    return minitron.collect_importance(model, ids, minitron.ImportanceConfig(batch_size=4, depth_ppl=True, head_output=True),
                                       progress=False)


def masked_reference(model, ids, plan: PrunePlan):
    """Logits of the ORIGINAL model with dropped neurons/heads zeroed and dropped layers made identity."""
    adapter = get_adapter(model)
    layers = model.get_submodule(adapter.layers)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else model.config.hidden_size // model.config.num_attention_heads
    handles = []

    def zero_input(keep: torch.Tensor, width: int):
        mask = torch.zeros(width)
        mask[keep] = 1.0
        return lambda module, args: (args[0] * mask,)

    for l, layer in enumerate(layers):
        if plan.layers is not None and l not in plan.layers.tolist():
            handles.append(layer.register_forward_hook(
                lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
            continue
        if l in plan.mlp:
            down = layer.get_submodule(adapter.down_proj)
            handles.append(down.register_forward_pre_hook(zero_input(plan.mlp[l], down.in_features)))
        if l in plan.heads:
            rows = (plan.heads[l].unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()
            o_proj = layer.get_submodule(adapter.o_proj)
            handles.append(o_proj.register_forward_pre_hook(zero_input(rows, o_proj.in_features)))
    try:
        return logits(model, ids)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    "target",
    [
        Target(intermediate_size=40),
        Target(num_attention_heads=4),
        Target(num_attention_heads=2),
        Target(num_hidden_layers=2),
        Target(intermediate_size=56, num_attention_heads=4, num_hidden_layers=3),
    ],
    ids=["mlp", "heads4", "heads2", "depth", "mlp+heads+depth"],
)
def test_pruned_equals_masked_original(family, calib_ids, target):
    model = make_model(family)
    if target.num_attention_heads and model.config.num_key_value_heads == 6:
        target = Target(num_attention_heads=target.num_attention_heads * 3 if target.num_attention_heads == 2 else 6)
    plan = make_plan(scores_for(model, calib_ids), target, model.config, head_residual=False)
    pruned = apply_plan(model, plan)
    expected = masked_reference(model, calib_ids, plan)
    torch.testing.assert_close(logits(pruned, calib_ids), expected, atol=ATOL, rtol=1e-4)


def sliced_reference_state(model, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Independent slicing of the original state dict along the hidden axis (rules written out by hand).

    Gemma multiplies the embedding output by ``sqrt(config.hidden_size)``: the kept embedding columns are
    scaled by ``c = sqrt(D / K)`` so the stream keeps its values, and with tied embeddings the final
    ``(1 + w)`` norm by ``1 / c`` (it feeds the lm_head, which is the scaled embedding).
    """
    h = plan.hidden
    out = {}
    c = (model.config.hidden_size / h.numel()) ** 0.5
    scaled = hasattr(model.model.embed_tokens, "embed_scale")
    for key, t in model.state_dict().items():
        if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
            t = t[:, h]
            if scaled and (key.endswith("embed_tokens.weight") or model.config.tie_word_embeddings):
                t = t.clone().mul_(c)
        elif scaled and key == "model.norm.weight" and model.config.tie_word_embeddings:
            t = t[h].clone().add_(1.0).mul_(1.0 / c).sub_(1.0)
        elif ("norm" in key and "q_norm" not in key and "k_norm" not in key):
            t = t[h]
        elif any(s in key for s in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                                    "up_proj.weight", "c_fc.weight")):
            t = t[:, h]
        elif any(s in key for s in ("o_proj.weight", "down_proj.weight", "c_proj.weight")):
            t = t[h, :]
        elif any(s in key for s in ("o_proj.bias", "down_proj.bias", "c_proj.bias")):
            t = t[h]
        out[key] = t.clone()
    return out


def test_hidden_pruning_matches_sliced_reference(family, calib_ids):
    model = make_model(family)
    plan = make_plan(scores_for(model, calib_ids), Target(hidden_size=36), model.config, norm_rescale=False)
    assert plan.hidden.numel() == 36 and torch.all(plan.hidden[1:] > plan.hidden[:-1])
    pruned = apply_plan(model, plan)
    reference = copy.deepcopy(pruned)
    reference.load_state_dict(sliced_reference_state(model, plan), strict=True)
    torch.testing.assert_close(logits(pruned, calib_ids), logits(reference, calib_ids), atol=0, rtol=0)
    if model.config.tie_word_embeddings:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_all_axes_save_reload_and_generate(family, calib_ids, tmp_path):
    model = make_model(family)
    before = copy.deepcopy(model.state_dict())
    mha = model.config.num_key_value_heads == 6
    target = Target(hidden_size=36 if mha else 40, intermediate_size=64, num_attention_heads=6 if mha else 4,
                    num_hidden_layers=3)
    pruned = minitron.prune(model, calib_ids, target, seq_len=16, progress=False, verbose=False)
    # the input model is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 4
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (target.hidden_size, 64, 3)
    assert c.head_dim == 8
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    if getattr(c, "layer_types", None) is not None:
        assert len(c.layer_types) == 3

    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    torch.testing.assert_close(logits(reloaded, calib_ids), logits(pruned, calib_ids), atol=0, rtol=0)
    assert (tmp_path / "model.safetensors").exists()

    # KV-cache decoding after depth pruning: incremental logits equal a full forward
    assert_kv_cache_generation(reloaded, calib_ids)


def test_inplace_prune_reuses_model_object(calib_ids):
    model = make_model("llama")
    reference = apply_plan(model, make_plan(scores_for(model, calib_ids), Target(hidden_size=36, intermediate_size=64), model.config))
    result = minitron.prune(model, calib_ids, Target(hidden_size=36, intermediate_size=64), seq_len=16,
                            inplace=True, progress=False, verbose=False)
    assert result is model
    assert model.config.hidden_size == 36 and model.model.embed_tokens.weight.shape == (101, 36)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (64, 36)
    torch.testing.assert_close(logits(model, calib_ids), logits(reference, calib_ids), atol=0, rtol=0)


def _layer_drop_losses_by_hand(model, ids) -> torch.Tensor:
    """(L,) next-token loss of the full HF forward with each layer made the identity (no minitron code)."""
    layers = model.get_submodule(get_adapter(model).layers)
    losses = []
    for layer in layers:
        handle = layer.register_forward_hook(
            lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        try:
            out = logits(model, ids)  # (B, S, V)
        finally:
            handle.remove()
        losses.append(torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()))
    return torch.stack(losses)


def _block_importance_by_hand(model, ids) -> torch.Tensor:
    """(L,) 1 - mean over tokens of cos(layer input, layer output), from forward hooks."""
    layers = model.get_submodule(get_adapter(model).layers)
    cos = {}

    def hook(l):
        def fn(m, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            cos[l] = torch.nn.functional.cosine_similarity(h_in.flatten(0, 1), h_out.flatten(0, 1), dim=-1).mean()
        return fn

    handles = [layer.register_forward_hook(hook(l), with_kwargs=True) for l, layer in enumerate(layers)]
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return 1.0 - torch.stack([cos[l] for l in range(len(layers))])


def _kept_layers(model, pruned) -> list[int]:
    """Original indices of the pruned model's layers, found by their (unchanged) weights."""
    adapter = get_adapter(model)
    original = [layer.get_submodule(adapter.q_proj).weight for layer in model.get_submodule(adapter.layers)]
    kept = []
    for layer in pruned.get_submodule(adapter.layers):
        w = layer.get_submodule(adapter.q_proj).weight
        kept.append(next(l for l, o in enumerate(original) if o.shape == w.shape and torch.equal(o, w)))
    return kept


@pytest.mark.parametrize("metric", ["ppl", "bi"])
@pytest.mark.parametrize("mode", ["scattered", "contiguous"])
def test_depth_keeps_the_layers_the_metric_ranks_highest(calib_ids, metric, mode):
    model = make_model("llama")
    n, keep = model.config.num_hidden_layers, 2
    pruned = minitron.prune(model, calib_ids, Target(num_hidden_layers=keep), seq_len=16, depth_metric=metric,
                            depth_mode=mode, progress=False, verbose=False)
    assert pruned.config.num_hidden_layers == keep
    kept = _kept_layers(model, pruned)
    assert kept == sorted(kept) and len(set(kept)) == keep
    # the independent ranking: higher = more important (loss without the layer / 1 - cos)
    score = _layer_drop_losses_by_hand(model, calib_ids) if metric == "ppl" else _block_importance_by_hand(model, calib_ids)
    if mode == "scattered":
        expected = sorted(score.argsort(descending=True)[:keep].tolist())
        assert (score.sort().values.diff().abs() > 1e-5).all()  # no near-tie could flip the selection
    else:
        drop = n - keep  # the contiguous block of `drop` layers with the lowest total score goes
        sums = [score[s : s + drop].sum().item() for s in range(n - drop + 1)]
        start = min(range(len(sums)), key=sums.__getitem__)
        expected = [l for l in range(n) if not start <= l < start + drop]
        dropped = [l for l in range(n) if l not in kept]
        assert dropped == list(range(dropped[0], dropped[0] + drop))  # one contiguous block removed
    assert kept == expected, (metric, mode, score.tolist())


def test_random_baseline(calib_ids):
    """Same shape as the importance selection, a different selection, reproducible per seed, and exactly the
    masked original of its plan."""
    model = make_model("qwen2")
    target = Target(hidden_size=40, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3)
    a = minitron.prune(model, calib_ids, target, seq_len=16, progress=False, verbose=False)
    b = minitron.prune(model, target=target, method="random", seed=3, verbose=False)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}

    def same(x, y) -> bool:
        return all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())

    assert not same(a, b)  # random is not the activation selection
    assert same(b, minitron.prune(model, target=target, method="random", seed=3, verbose=False))  # reproducible
    assert not same(b, minitron.prune(model, target=target, method="random", seed=4, verbose=False))
    # without hidden pruning (no norm involved) the random model is the original with its plan masked
    narrow = Target(intermediate_size=64, num_attention_heads=4, num_hidden_layers=3)
    for seed in (3, 4):
        plan = minitron.random_plan(model.config, narrow, seed)
        assert plan.layers.numel() == 3 and all(v.numel() == 64 for v in plan.mlp.values())
        pruned = minitron.prune(model, target=narrow, method="random", seed=seed, verbose=False)
        torch.testing.assert_close(logits(pruned, calib_ids), masked_reference(model, calib_ids, plan),
                                   atol=ATOL, rtol=1e-4)


def test_scores_roundtrip_one_calibration_many_targets(calib_ids, tmp_path):
    model = make_model("starcoder2")
    scores = scores_for(model, calib_ids)
    scores.save(tmp_path / "scores.safetensors")
    loaded = minitron.ImportanceScores.load(tmp_path / "scores.safetensors")
    for target in (Target(hidden_size=32), Target(intermediate_size=48, num_hidden_layers=2)):
        a = minitron.prune(model, target=target, scores=scores, verbose=False)
        b = minitron.prune(model, target=target, scores=loaded, verbose=False)
        torch.testing.assert_close(logits(a, calib_ids), logits(b, calib_ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="recompute scores"):
        minitron.prune(make_model("llama"), target=Target(hidden_size=32), scores=loaded, verbose=False)


def test_default_calibration_serves_the_default_head_criterion(calib_ids):
    """README's "one calibration, many targets": collect_importance's defaults fit prune's defaults on heads."""
    model = make_model("llama")
    scores = minitron.collect_importance(model, calib_ids, progress=False)  # every default
    small = minitron.prune(model, target=Target(num_attention_heads=4), scores=scores, verbose=False)
    # the same heads as a prune that calibrates by itself (where prune switches the output norms on)
    direct = minitron.prune(model, calib_ids, Target(num_attention_heads=4), verbose=False,
                            config=minitron.PruneConfig(seq_len=16))
    torch.testing.assert_close(logits(small, calib_ids), logits(direct, calib_ids), atol=0, rtol=0)
    # a prune that calibrates for a target that prunes no head does not pay for the head-output norms
    assert minitron.pruner.loss_scores_for(minitron.ImportanceConfig(), Target(hidden_size=32), model.config,
                                           "ppl", "output").head_output is False


def test_params_budget(calib_ids):
    model = make_model("llama")
    total = minitron.count_parameters(model)
    target = minitron.target_for_budget(model, 0.7, hidden_divisor=4, ffn_divisor=8)
    pruned_params = minitron.target_parameters(model, target)
    assert pruned_params <= 0.7 * total
    assert pruned_params > 0.6 * total  # the largest width that fits, not an arbitrary small one
    pruned = minitron.prune(model, calib_ids, params=0.7, seq_len=16, progress=False, verbose=False)
    assert minitron.count_parameters(pruned) <= 0.7 * total


def test_kv_group_pruning_is_explicit_and_equals_masked_original(family, calib_ids, tmp_path):
    model = make_model(family)
    kv, head_dim = model.config.num_key_value_heads, 8
    target = Target(num_attention_heads=2, num_key_value_heads=1) if kv == 2 else Target(num_attention_heads=3, num_key_value_heads=3)
    scores = scores_for(model, calib_ids)
    plan = make_plan(scores, target, model.config, head_residual=False)
    group = model.config.num_attention_heads // kv
    for l, groups in plan.kv_groups.items():
        assert all(int(h) // group in groups.tolist() for h in plan.heads[l])  # query heads of kept groups only
        strongest = scores.heads()[l].view(kv, group).norm(dim=-1).topk(target.num_key_value_heads).indices.sort().values
        assert torch.equal(groups, strongest)
    pruned = apply_plan(model, plan)
    assert pruned.config.num_key_value_heads == target.num_key_value_heads
    attn = pruned.model.layers[0].self_attn
    if hasattr(attn, "qkv_proj"):  # Phi-3: fused rows [q | k | v]
        rows = (target.num_attention_heads + 2 * target.num_key_value_heads) * head_dim
        assert attn.qkv_proj.weight.shape[0] == rows
    else:
        assert attn.k_proj.weight.shape[0] == target.num_key_value_heads * head_dim
    torch.testing.assert_close(logits(pruned, calib_ids), masked_reference(model, calib_ids, plan), atol=ATOL, rtol=1e-4)
    pruned.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path), calib_ids), logits(pruned, calib_ids))


def test_heads_only_never_touches_kv(calib_ids):
    model = make_model("qwen2")
    pruned = minitron.prune(model, calib_ids, Target(num_attention_heads=2), seq_len=16, progress=False, verbose=False)
    assert pruned.config.num_key_value_heads == 2
    for old, new in zip(model.model.layers, pruned.model.layers):
        assert torch.equal(old.self_attn.k_proj.weight, new.self_attn.k_proj.weight)
        assert torch.equal(old.self_attn.v_proj.bias, new.self_attn.v_proj.bias)


@pytest.mark.parametrize("head_metric", ["input", "output", "loss"])
def test_every_head_metric_prunes_to_the_masked_original(calib_ids, head_metric):
    model = make_model("mistral")
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=4, head_loss=True, head_output=True),
                                         progress=False)
    plan = make_plan(scores, Target(num_attention_heads=4), model.config, head_metric=head_metric, head_residual=False)
    ranked = scores.heads(metric=head_metric).view(4, 2, 3)  # (L, kv, g)
    for l, kept in plan.heads.items():  # in every group the weakest head by this metric is the one dropped
        dropped = sorted(set(range(6)) - set(kept.tolist()))
        assert dropped == [g * 3 + int(ranked[l, g].argmin()) for g in range(2)]
    torch.testing.assert_close(logits(apply_plan(model, plan), calib_ids), masked_reference(model, calib_ids, plan),
                               atol=ATOL, rtol=1e-4)


def test_norm_rescale_matches_independent_computation(family, calib_ids):
    """Every kept RMSNorm weight is multiplied by sqrt(mean over calibration tokens of rms_K(x_K)^2 / rms_D(x)^2),
    recomputed here from the captured norm inputs; LayerNorm (Starcoder2) is left as it is."""
    model = make_model(family)
    scores = scores_for(model, calib_ids)
    plan = make_plan(scores, Target(hidden_size=36), model.config, norm_rescale=True)
    keep = plan.hidden
    norms = {f"model.layers.{l}.{name}.weight": getattr(layer, name) for l, layer in enumerate(model.model.layers)
             for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm") if hasattr(layer, name)}  # Gemma: four per layer
    norms["model.norm.weight"] = model.model.norm
    offset = 1.0 if "Gemma" in type(model).__name__ else 0.0  # Gemma's norm multiplies by (1 + weight)
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, k=k: inputs.setdefault(k, []).append(a[0])) for k, m in norms.items()]
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for h in handles:
        h.remove()
    reference = sliced_reference_state(model, plan)
    layer_norm = isinstance(model.model.norm, torch.nn.LayerNorm)
    for key, xs in inputs.items():
        x = torch.cat(xs).double().reshape(-1, 48)  # every calibration token (N, D)
        eps = model.config.rms_norm_eps if not layer_norm else None
        if layer_norm:
            factor = 1.0
        else:
            ratio_sq = x[:, keep].square().mean(-1) / (x.square().mean(-1) + eps)  # (N,) rms_K^2 / rms_D^2
            factor = float(ratio_sq.mean().sqrt())
        reference[key] = (reference[key] + offset) * factor - offset
    pruned = apply_plan(model, plan)
    expected = copy.deepcopy(pruned)
    expected.load_state_dict(reference, strict=True)
    for key in norms:
        torch.testing.assert_close(pruned.state_dict()[key], reference[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(pruned, calib_ids), logits(expected, calib_ids), atol=1e-5, rtol=1e-4)
    # in place gives the same model; without the option the weights are plainly sliced
    inplace = apply_plan(copy.deepcopy(model), plan, inplace=True)
    torch.testing.assert_close(logits(inplace, calib_ids), logits(pruned, calib_ids), atol=0, rtol=0)
    plain_plan = make_plan(scores, Target(hidden_size=36), model.config, norm_rescale=False)
    plain = apply_plan(model, plain_plan)
    torch.testing.assert_close(plain.model.norm.weight, sliced_reference_state(model, plain_plan)["model.norm.weight"],
                               atol=0, rtol=0)


def test_head_residual_equals_original_with_dropped_heads_replaced_by_their_group_mean(family, calib_ids):
    """Folding a dropped head's o_proj columns into the kept heads of its KV group equals feeding o_proj,
    in place of the dropped head's output, the mean output of the kept heads of that group."""
    model = make_model(family)
    before = copy.deepcopy(model.state_dict())
    kv = model.config.num_key_value_heads
    group, head_dim = 6 // kv, 8
    target = Target(num_attention_heads=4) if kv == 2 else Target(num_attention_heads=3, num_key_value_heads=3)
    plan = make_plan(scores_for(model, calib_ids), target, model.config, head_residual=True)
    pruned = apply_plan(model, plan)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key

    def replace_dropped(keep: torch.Tensor):
        def hook(module, args):
            a = args[0].view(*args[0].shape[:-1], 6, head_dim).clone()  # (B, S, H, hd)
            out = torch.zeros_like(a)
            for g in range(kv):
                heads = range(g * group, (g + 1) * group)
                kept = [h for h in heads if h in keep.tolist()]
                for h in heads:
                    if h in kept:
                        out[..., h, :] = a[..., h, :]
                    elif kept:  # a dropped head of a group with kept heads
                        out[..., h, :] = a[..., kept, :].mean(dim=-2)
            return (out.flatten(-2),)
        return hook

    handles = [model.model.layers[l].self_attn.o_proj.register_forward_pre_hook(replace_dropped(keep))
               for l, keep in plan.heads.items()]
    try:
        expected = logits(model, calib_ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits(pruned, calib_ids), expected, atol=ATOL, rtol=1e-4)
    plain = logits(apply_plan(model, make_plan(scores_for(model, calib_ids), target, model.config, head_residual=False)),
                   calib_ids)
    if kv == 2:  # GQA: the folded columns change the model
        assert not torch.allclose(plain, expected, atol=1e-3)
    else:  # MHA: whole KV groups (of one head) are dropped, no kept head shares their values: nothing to fold
        torch.testing.assert_close(plain, expected, atol=ATOL, rtol=1e-4)


def test_params_budget_shape_is_the_lowest_calibration_loss(calib_ids):
    from minitron.pruning.budget import budget_candidates, choose_budget_target

    model = make_model("llama")
    total = minitron.count_parameters(model)
    scores = scores_for(model, calib_ids)
    target, candidates = choose_budget_target(model, 0.7, scores, calib_ids[:4], hidden_divisor=6, ffn_divisor=8,
                                              batch_size=4, plan_options=dict(norm_rescale=True))
    assert len(candidates) >= 3 and len({c.target.hidden_size for c in candidates}) == len(candidates)
    for c in candidates:
        assert c.params == minitron.target_parameters(model, c.target) <= 0.7 * total
        if c.target.intermediate_size < 88:  # the largest FFN that fits: one step more breaks the budget
            wider = Target(hidden_size=c.target.hidden_size, intermediate_size=c.target.intermediate_size + 8)
            assert minitron.target_parameters(model, wider) > 0.7 * total
        pruned = minitron.prune(model, target=c.target, scores=scores, norm_rescale=True, verbose=False)
        assert c.loss == pytest.approx(minitron.lm_loss(pruned, calib_ids[:4]), rel=1e-6)
    assert target == min(candidates, key=lambda c: c.loss).target
    assert [c.target for c in candidates] == [c.target for c in budget_candidates(model, 0.7, hidden_divisor=6,
                                                                                  ffn_divisor=8)]
    # prune(params=...) with calibration data takes the measured shape (default divisors)
    pruned = minitron.prune(model, calib_ids, params=0.7, seq_len=16, budget_blocks=4, norm_rescale=True,
                            importance=minitron.ImportanceConfig(batch_size=4), progress=False, verbose=False)
    chosen, _ = choose_budget_target(model, 0.7, scores, calib_ids[:4], batch_size=4, plan_options=dict(norm_rescale=True))
    assert (pruned.config.hidden_size, pruned.config.intermediate_size) == (chosen.hidden_size, chosen.intermediate_size)


def test_phi3_longrope_prunes_with_hidden_equal_heads_times_head_dim(calib_ids, tmp_path):
    """Phi-3 128k / 3.5 ship longrope, whose factors Phi3Config checks against hidden_size // heads: pruning
    hidden and heads together (32 = 4 * 8) keeps it valid; the pruned model reloads and generates alike."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from tests.helpers import COMMON, randomize_

    torch.manual_seed(0)
    model = randomize_(Phi3ForCausalLM(Phi3Config(
        **COMMON, head_dim=8, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        original_max_position_embeddings=8,  # shorter than the calibration rows: the long factors are used
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1], "long_factor": [1.0, 1.5]})))
    pruned = minitron.prune(model, calib_ids, Target(hidden_size=32, num_attention_heads=4, intermediate_size=64),
                            seq_len=16, progress=False, verbose=False)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, calib_ids), logits(pruned, calib_ids))
    # cached decoding (longrope switches factors past original_max_position_embeddings, in both alike)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(calib_ids[:2, :6], **gen), reloaded.generate(calib_ids[:2, :6], **gen))


def test_depth_pruning_keeps_layer_types_and_equals_the_original_skipping_the_layer(family, calib_ids):
    """Dropping layer 1: ``layer_types`` (sliding / full attention) is taken at the kept layers, every kept
    layer keeps its own attention kind, and the pruned model (copy and in place) computes what the original
    does with layer 1 passing its input through."""
    model = make_model(family)
    plan = PrunePlan(layers=torch.tensor([0, 2, 3]))
    layer = model.model.layers[1]
    hook = layer.register_forward_hook(
        lambda m, args, kwargs, out: kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], with_kwargs=True)
    expected = logits(model, calib_ids)
    hook.remove()
    types = getattr(model.config, "layer_types", None)
    windows = [getattr(l.self_attn, "sliding_window", None) for l in model.model.layers]
    for pruned in (apply_plan(model, plan), apply_plan(copy.deepcopy(model), plan, inplace=True)):
        assert pruned.config.num_hidden_layers == 3
        if types is not None:
            assert pruned.config.layer_types == [types[0], types[2], types[3]]
        assert [getattr(l.self_attn, "sliding_window", None) for l in pruned.model.layers] == [windows[0], windows[2],
                                                                                                  windows[3]]
        torch.testing.assert_close(logits(pruned, calib_ids), expected, atol=ATOL, rtol=1e-4)
