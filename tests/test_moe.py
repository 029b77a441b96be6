"""Mixture-of-experts families (Mixtral, Qwen2-MoE with a shared expert, Qwen3-MoE): importance,
expert / expert-FFN / shared-expert pruning composed with the dense axes, in place and copied.

The reference for a pruned MoE model is the ORIGINAL model with
- the dropped experts' router logits at -inf (the router picks its top-k among the kept experts
  and its softmax runs over them: exactly what the pruned router computes),
- each kept expert's dropped neurons zeroed (their ``down_proj`` columns),
- dropped dense / shared-expert neurons and heads zeroed at the input of their output projection,
- dropped layers made the identity.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

import minitron
from minitron.adapters import get_adapter, head_dim_of, moe_sizes, sparse_layers
from minitron.importance.experts import routed_experts_forward
from minitron.ops.expert_gather import compact_experts_, select_experts
from minitron.pruning import PrunePlan, Target, apply_plan, make_plan, random_plan
from tests.helpers import COMMON, MOE_COMMON, MOE_FAMILY_NAMES, assert_kv_cache_generation, make_moe_model

@pytest.fixture(params=MOE_FAMILY_NAMES)
def moe_family(request) -> str:
    return request.param


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def scores_for(model, ids, **kw):
    cfg = minitron.ImportanceConfig(**{"batch_size": 4, "depth_ppl": True, "head_output": True, **kw})
    return minitron.collect_importance(model, ids, cfg, progress=False)


def _router_top_k(router, x: torch.Tensor, allowed: torch.Tensor | None):
    """The router written out (Mixtral / Qwen MoE), with the experts outside ``allowed`` at -inf."""
    logits_ = F.linear(x.reshape(-1, x.shape[-1]), router.weight)
    if allowed is not None:
        mask = torch.full((logits_.shape[-1],), float("-inf"))
        mask[allowed] = 0.0
        logits_ = logits_ + mask
    probs = torch.softmax(logits_.float(), dim=-1)
    top, idx = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        top = top / top.sum(dim=-1, keepdim=True)
    return logits_, top.to(logits_.dtype), idx


def masked_reference(model, ids, plan: PrunePlan):
    """Logits of the original model with the plan's dropped experts, neurons, heads and layers masked out."""
    model = copy.deepcopy(model)
    sparse = sparse_layers(model.config)
    head_dim = head_dim_of(model.config)
    handles = []

    def zero_input(keep: torch.Tensor, width: int):
        mask = torch.zeros(width)
        mask[keep] = 1.0
        return lambda module, args: (args[0] * mask,)

    with torch.no_grad():
        for l, layer in enumerate(model.model.layers):
            if plan.layers is not None and l not in plan.layers.tolist():
                handles.append(layer.register_forward_hook(
                    lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True))
                continue
            if l in plan.heads:
                rows = (plan.heads[l].unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()
                o_proj = layer.self_attn.o_proj
                handles.append(o_proj.register_forward_pre_hook(zero_input(rows, o_proj.in_features)))
            if not sparse[l]:
                if l in plan.mlp:
                    handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                        zero_input(plan.mlp[l], layer.mlp.down_proj.in_features)))
                continue
            experts = layer.mlp.experts
            kept = plan.experts.get(l, torch.arange(experts.gate_up_proj.shape[0]))
            if l in plan.expert_mlp:  # zero each kept expert's dropped neurons (down_proj columns)
                for row, e in enumerate(kept.tolist()):
                    dropped = torch.ones(experts.down_proj.shape[-1], dtype=torch.bool)
                    dropped[plan.expert_mlp[l][row]] = False
                    experts.down_proj[e][:, dropped] = 0.0
            if l in plan.experts:
                router = layer.mlp.gate
                router.forward = lambda x, router=router, allowed=plan.experts[l]: _router_top_k(router, x, allowed)
            if l in plan.shared_mlp:
                down = layer.mlp.shared_expert.down_proj
                handles.append(down.register_forward_pre_hook(zero_input(plan.shared_mlp[l], down.in_features)))
    return logits(model, ids)


# ---- calibration ------------------------------------------------------------------------------

def test_routed_experts_forward_equals_the_models_own(moe_family):
    model = make_moe_model(moe_family)
    layer = next(layer for l, layer in enumerate(model.model.layers) if sparse_layers(model.config)[l])
    x = torch.randn(20, model.config.hidden_size)
    _, weights, idx = layer.mlp.gate(x)
    seen = []
    out = routed_experts_forward(layer.mlp.experts, x, idx, weights, lambda e, t, w, a, o: seen.append(e))
    with torch.no_grad():
        torch.testing.assert_close(out, layer.mlp.experts(x, idx, weights), atol=1e-6, rtol=1e-5)
    assert sorted(seen) == sorted(set(idx.flatten().tolist()))


@pytest.mark.parametrize("seq_agg", ["mean", "l2"])
def test_expert_statistics_match_a_dense_recomputation(moe_family, calib_ids, seq_agg):
    """Per-expert neuron and output statistics = every expert run on every token, times its routing weight
    (0 where the token is not routed to it), aggregated over the sequence, then L2 over the samples."""
    model = make_moe_model(moe_family)
    l = sparse_layers(model.config).index(True)
    layer = model.model.layers[l]
    captured = []
    handle = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    scores = scores_for(model, calib_ids, seq_agg=seq_agg, depth_ppl=False)
    handle.remove()
    x = torch.cat(captured)  # (N, S, D) the MoE block's input, all calibration samples
    n, s, d = x.shape
    _, top, idx = _router_top_k(layer.mlp.gate, x, None)
    weight = torch.zeros(n * s, 6)
    weight.scatter_(1, idx, top)  # (N*S, E) routing weight of each expert (0: not routed)
    experts = layer.mlp.experts
    acts, outs = [], []
    for e in range(6):
        gate, up = F.linear(x.reshape(-1, d), experts.gate_up_proj[e]).chunk(2, dim=-1)
        act = experts.act_fn(gate) * up
        acts.append(act * weight[:, e : e + 1])
        outs.append(F.linear(act, experts.down_proj[e]).norm(dim=-1) * weight[:, e])
    act = torch.cat(acts, dim=1).view(n, s, -1)  # (N, S, E*F)
    out = torch.stack(outs, dim=1).view(n, s, 6)
    agg = (lambda a: a.abs().mean(1)) if seq_agg == "mean" else (lambda a: a.square().sum(1).sqrt())
    expected_mlp = agg(act).norm(dim=0).view(6, -1)  # batch_agg l2
    torch.testing.assert_close(scores.expert_mlp(l), expected_mlp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores.experts(l), agg(out).norm(dim=0), atol=1e-5, rtol=1e-4)
    if moe_family == "qwen2_moe":
        assert scores.site_scores(f"shared_mlp.{l}").shape == (56,)
    # the model's own experts forward is back after calibration
    assert "forward" not in experts.__dict__


def test_var_sequence_aggregation_is_refused_with_the_alternatives(calib_ids):
    with pytest.raises(ValueError, match="seq_agg='mean' or 'l2'"):
        scores_for(make_moe_model("mixtral"), calib_ids, seq_agg="var", batch_agg="mean")


# ---- pruning = masked original ----------------------------------------------------------------

TARGETS = {
    "experts": dict(num_experts=4),
    "expert_ffn": dict(expert_intermediate_size=24),
    "experts+ffn+heads+depth": dict(num_experts=3, expert_intermediate_size=16, num_attention_heads=4,
                                    num_hidden_layers=3, intermediate_size=64),
    "shared": dict(shared_expert_intermediate_size=24),
}


@pytest.mark.parametrize("name", list(TARGETS))
def test_pruned_equals_masked_original(moe_family, calib_ids, name):
    fields = dict(TARGETS[name])
    if name == "shared" and moe_family != "qwen2_moe":
        pytest.skip("only Qwen2-MoE has a shared expert")
    if moe_family == "qwen2_moe" and name != "shared":
        fields["shared_expert_intermediate_size"] = 40
    model = make_moe_model(moe_family)
    target = Target(**fields)
    plan = make_plan(scores_for(model, calib_ids), target, model.config, head_residual=False)
    got, want = plan.target(model.config).resolved(model.config), target.resolved(model.config)
    if not any(not sparse_layers(model.config)[l] for l in (plan.layers.tolist() if plan.layers is not None else [])):
        got.intermediate_size = want.intermediate_size  # no dense MLP layer kept: nothing has that width
    assert got == want
    if "num_experts" in fields:
        assert all(v.numel() == fields["num_experts"] for v in plan.experts.values()) and plan.experts
    if "expert_intermediate_size" in fields:
        k = fields["expert_intermediate_size"]
        assert all(v.shape[1] == k and torch.all(v[:, 1:] > v[:, :-1]) for v in plan.expert_mlp.values())
    pruned = apply_plan(model, plan)
    torch.testing.assert_close(logits(pruned, calib_ids), masked_reference(model, calib_ids, plan), atol=1e-5, rtol=1e-4)


def test_each_expert_keeps_its_own_highest_scoring_neurons(calib_ids):
    model = make_moe_model("mixtral")
    scores = scores_for(model, calib_ids)
    plan = make_plan(scores, Target(num_experts=4, expert_intermediate_size=8), model.config)
    for l, kept in plan.experts.items():
        assert torch.equal(kept, scores.experts(l).topk(4).indices.sort().values)
        per_expert = scores.expert_mlp(l)
        for row, e in enumerate(kept.tolist()):
            assert torch.equal(plan.expert_mlp[l][row], per_expert[e].topk(8).indices.sort().values)
    # neurons are ranked per expert: the experts do not all keep the same indices
    assert any(not torch.equal(v[0], v[1]) for v in plan.expert_mlp.values())


def test_tokens_routed_only_to_kept_experts_are_unchanged_with_renormalised_top_k(calib_ids):
    """Mixtral renormalises the top-k weights: for a token whose top-k experts are all kept, the pruned
    layer's output equals the original layer's, whatever the other experts' logits were."""
    model = make_moe_model("mixtral")
    plan = make_plan(scores_for(model, calib_ids), Target(num_experts=4), model.config)
    pruned = apply_plan(model, plan)
    x = torch.randn(64, model.config.hidden_size)
    block, small = model.model.layers[0].mlp, pruned.model.layers[0].mlp
    with torch.no_grad():
        _, _, idx = block.gate(x)
        only_kept = torch.isin(idx, plan.experts[0]).all(dim=1)
        assert 0 < int(only_kept.sum()) < 64
        full, cut = block(x[None])[0], small(x[None])[0]
    torch.testing.assert_close(cut[only_kept], full[only_kept], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(cut[~only_kept], full[~only_kept], atol=1e-4)


def test_unnormalised_top_k_weights_are_renormalised_over_the_kept_experts(calib_ids):
    """Qwen2-MoE (norm_topk_prob=False) weights a token's experts by their softmax probability over ALL
    experts; pruned, the softmax runs over the kept ones, so each kept weight grows by Z_all / Z_kept."""
    model = make_moe_model("qwen2_moe")
    assert model.config.norm_topk_prob is False
    plan = make_plan(scores_for(model, calib_ids), Target(num_experts=4), model.config)
    pruned = apply_plan(model, plan)
    x = torch.randn(32, model.config.hidden_size)
    with torch.no_grad():
        logits_all = F.linear(x, model.model.layers[0].mlp.gate.weight)
        _, w_small, i_small = pruned.model.layers[0].mlp.gate(x)
    kept = plan.experts[0]
    z_all, z_kept = logits_all.exp().sum(-1), logits_all[:, kept].exp().sum(-1)
    expected = logits_all[:, kept].gather(1, i_small).exp() / z_kept[:, None]
    torch.testing.assert_close(w_small, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(z_all > z_kept)


def test_hidden_pruning_slices_router_experts_and_shared_expert(moe_family, calib_ids):
    """Every MoE tensor gathered by hand from the original state: router rows/columns, the 3-D expert
    tensors (kept experts, each expert's own neurons, hidden channels), the shared expert and its gate."""
    model = make_moe_model(moe_family)
    extra = {"shared_expert_intermediate_size": 48} if moe_family == "qwen2_moe" else {}
    plan = make_plan(scores_for(model, calib_ids), Target(hidden_size=40, num_experts=5, expert_intermediate_size=32,
                                                          **extra), model.config, norm_rescale=False)
    pruned = apply_plan(model, plan)
    state, h = model.state_dict(), plan.hidden
    ffn = moe_sizes(model.config)["expert_intermediate_size"]
    for l in plan.experts:
        p = f"model.layers.{l}.mlp."
        kept, neurons = plan.experts[l], plan.expert_mlp[l]
        torch.testing.assert_close(pruned.state_dict()[p + "gate.weight"], state[p + "gate.weight"][kept][:, h], atol=0, rtol=0)
        gate_up, down = state[p + "experts.gate_up_proj"], state[p + "experts.down_proj"]
        for row, e in enumerate(kept.tolist()):
            rows = torch.cat([neurons[row], neurons[row] + ffn])
            torch.testing.assert_close(pruned.state_dict()[p + "experts.gate_up_proj"][row], gate_up[e][rows][:, h],
                                       atol=0, rtol=0)
            torch.testing.assert_close(pruned.state_dict()[p + "experts.down_proj"][row], down[e][h][:, neurons[row]],
                                       atol=0, rtol=0)
        if moe_family == "qwen2_moe":
            s = plan.shared_mlp[l]
            got = pruned.state_dict()
            torch.testing.assert_close(got[p + "shared_expert.up_proj.weight"], state[p + "shared_expert.up_proj.weight"][s][:, h], atol=0, rtol=0)
            torch.testing.assert_close(got[p + "shared_expert.down_proj.weight"], state[p + "shared_expert.down_proj.weight"][h][:, s], atol=0, rtol=0)
            torch.testing.assert_close(got[p + "shared_expert_gate.weight"], state[p + "shared_expert_gate.weight"][:, h], atol=0, rtol=0)
    assert logits(pruned, calib_ids).isfinite().all()


# ---- checkpoints, generation, in place ----------------------------------------------------------

def test_all_axes_save_reload_and_generate(moe_family, calib_ids, tmp_path):
    model = make_moe_model(moe_family)
    before = copy.deepcopy(model.state_dict())
    extra = {"shared_expert_intermediate_size": 32} if moe_family == "qwen2_moe" else {}
    target = Target(hidden_size=40, num_attention_heads=4, num_hidden_layers=3, num_experts=4,
                    expert_intermediate_size=24, **extra)
    pruned = minitron.prune(model, calib_ids, target, seq_len=16, progress=False, verbose=False)
    for key, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, before[key]), key
    sizes = moe_sizes(pruned.config)
    assert (sizes["num_experts"], sizes["expert_intermediate_size"]) == (4, 24)
    assert pruned.config.num_hidden_layers == 3 and pruned.config.hidden_size == 40
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(pruned)
    # dense and sparse layers stay where they were (Qwen MoE: mlp_only_layers renumbered after depth pruning)
    assert [hasattr(layer.mlp, "experts") for layer in reloaded.model.layers] == sparse_layers(reloaded.config)
    assert [hasattr(layer.mlp, "experts") for layer in pruned.model.layers] == sparse_layers(reloaded.config)
    torch.testing.assert_close(logits(reloaded, calib_ids), logits(pruned, calib_ids), atol=0, rtol=0)
    assert_kv_cache_generation(reloaded, calib_ids)


@pytest.mark.parametrize("fields", [dict(expert_intermediate_size=24),
                                    dict(hidden_size=40, num_experts=4, expert_intermediate_size=16, num_hidden_layers=3)],
                         ids=["expert_ffn_only", "all"])
def test_inplace_prune_of_a_mapped_checkpoint_equals_the_copy(moe_family, calib_ids, tmp_path, fields):
    make_moe_model(moe_family).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    scores = scores_for(reference, calib_ids)
    plan = make_plan(scores, Target(**fields), reference.config)
    copied = apply_plan(reference, plan)
    first_sparse = sparse_layers(model.config).index(True)
    experts = model.model.layers[first_sparse].mlp.experts
    out = apply_plan(model, plan, inplace=True)
    assert out is model
    if plan.layers is None:  # the same module objects, their tensors compacted
        assert model.model.layers[first_sparse].mlp.experts is experts
    assert experts.down_proj.shape[-1] == fields["expert_intermediate_size"]
    assert experts.intermediate_dim == fields["expert_intermediate_size"]  # cached attributes follow the config
    for key, value in copied.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    torch.testing.assert_close(logits(model, calib_ids), logits(copied, calib_ids), atol=0, rtol=0)


def test_random_plan_and_distillation_of_a_pruned_moe_student(calib_ids, tmp_path):
    from tests.helpers import quick_cfg, rows

    teacher = make_moe_model("qwen2_moe")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(4)  # more peaked next-token distributions: KD has signal
    plan = random_plan(teacher.config, Target(num_experts=3, expert_intermediate_size=16,
                                              shared_expert_intermediate_size=24), seed=3)
    assert all(v.numel() == 3 for v in plan.experts.values())
    student = apply_plan(teacher, plan)
    data = torch.randint(0, COMMON["vocab_size"], (72, 16), generator=torch.Generator().manual_seed(0))
    cfg = quick_cfg(tmp_path, steps=16, seq_len=16, batch_size=8, eval_every=16, lr=1e-3, min_lr=1e-4)
    minitron.distill(student, teacher, data[:64], eval_data=data[64:], config=cfg)
    first, last = rows(tmp_path, "eval")[0], rows(tmp_path, "eval")[-1]
    assert (first["step"], last["step"]) == (0, 16)
    assert last["kl_to_teacher"] < 0.9 * first["kl_to_teacher"]  # the routed student learns from the teacher


def test_pages_the_loader_read_for_converted_experts_are_dropped(tmp_path, calib_ids):
    """transformers saves experts per expert (w1/w2/w3) and stacks them while loading, in private memory:
    the file pages it read are no parameter's any more and are released (values unchanged)."""
    from minitron.ops.mapped import release_unreferenced_pages

    make_moe_model("mixtral").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    before = logits(model, calib_ids)
    tensors = [*model.parameters(), *model.buffers()]
    assert release_unreferenced_pages(tensors) > 0
    assert release_unreferenced_pages(tensors) == 0  # nothing of them left resident
    torch.testing.assert_close(logits(model, calib_ids), before, atol=0, rtol=0)


# ---- the 3-D gathers ----------------------------------------------------------------------------

CASES = [(0, "experts"), (1, "shared"), (1, "per_expert"), (2, "shared"), (2, "per_expert")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,kind", CASES)
def test_compact_experts_equals_select(dtype, dim, kind):
    g = torch.Generator().manual_seed(dim)
    shape = (5, 7, 13)  # odd sizes: no chunk or row lines up
    w = torch.randn(shape, generator=g).to(dtype)
    if kind == "per_expert":
        index = torch.stack([torch.randperm(shape[dim], generator=g)[:4].sort().values for _ in range(5)])
    else:
        index = torch.randperm(shape[dim], generator=g)[:3].sort().values
    expected = select_experts(w, dim, index)
    if kind == "per_expert":  # written out: expert e keeps its own indices
        manual = torch.stack([w[e].index_select(dim - 1, index[e]) for e in range(5)])
        assert torch.equal(expected, manual)
    out = compact_experts_(w, dim, index)
    assert torch.equal(out, expected)
    assert out.untyped_storage().nbytes() == out.numel() * out.element_size()  # storage shrunk in place


def test_compact_experts_per_expert_columns_in_small_chunks(monkeypatch):
    import minitron.ops.expert_gather as eg

    monkeypatch.setattr(eg, "_CHUNK_BYTES", 64)  # several row chunks per expert
    w = torch.randn(4, 9, 31)
    index = torch.stack([torch.randperm(31)[:17].sort().values for _ in range(4)])
    expected = select_experts(w, 2, index)
    assert torch.equal(compact_experts_(w, 2, index), expected)


def test_expert_gather_rejects_bad_indices():
    w = torch.randn(4, 6, 8)
    with pytest.raises(ValueError, match="prune the experts"):
        compact_experts_(w, 2, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dim 1 or 2"):
        select_experts(w, 0, torch.zeros(4, 2, dtype=torch.long))


# ---- bad input ------------------------------------------------------------------------------------

def test_infeasible_moe_targets_name_the_fix():
    mixtral = make_moe_model("mixtral")
    with pytest.raises(ValueError, match="keep at least 2"):
        Target(num_experts=1).validate(mixtral.config)
    with pytest.raises(ValueError, match="name the same MixtralConfig field"):
        Target(intermediate_size=32, expert_intermediate_size=24).validate(mixtral.config)
    Target(intermediate_size=24).validate(mixtral.config)  # Mixtral's own name for the expert width
    assert Target(intermediate_size=24).resolved(mixtral.config).expert_intermediate_size == 24
    with pytest.raises(ValueError, match="no shared expert"):
        Target(shared_expert_intermediate_size=8).validate(mixtral.config)
    with pytest.raises(ValueError, match="larger than the model"):
        Target(num_experts=8).validate(mixtral.config)
    with pytest.raises(ValueError, match=r"grouped GEMMs.*nearest: 40, 48"):  # a 42-wide stream crashes grouped_mm
        Target(hidden_size=42).validate(mixtral.config)
    with pytest.raises(ValueError, match=r"multiple of 8 \(nearest: 16, 24\)"):
        Target(expert_intermediate_size=20).validate(mixtral.config)
    dense = __import__("tests.helpers", fromlist=["make_model"]).make_model("llama")
    with pytest.raises(ValueError, match="not a mixture-of-experts model"):
        Target(num_experts=2).validate(dense.config)


def test_pruning_summary_names_experts_and_only_existing_dense_ffn():
    from minitron.pruner import pruning_summary

    mixtral = make_moe_model("mixtral")
    line = pruning_summary(minitron.count_parameters(mixtral), mixtral)
    assert "experts 6 (top 2) x ffn 40" in line and "ffn 40," not in line.split("experts")[0]
    qwen2 = make_moe_model("qwen2_moe")
    assert "ffn 88" in pruning_summary(1, qwen2) and "shared ffn 56" in pruning_summary(1, qwen2)


def test_dense_ffn_target_on_an_all_sparse_model_is_refused():
    import transformers as tf

    model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**MOE_COMMON, head_dim=8, intermediate_size=88, moe_intermediate_size=40,
                                                     num_experts=6, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="no dense MLP has that width.*expert_intermediate_size"):
        Target(intermediate_size=64).validate(model.config)
    Target(intermediate_size=64).validate(make_moe_model("qwen3_moe").config)  # it has dense layers


def test_params_budget_on_moe_asks_for_an_explicit_target(calib_ids):
    with pytest.raises(ValueError, match="num_experts=.*expert_intermediate_size"):
        minitron.prune(make_moe_model("qwen3_moe"), calib_ids, params=0.5, seq_len=16, progress=False)


def test_masked_plan_refuses_moe_models_instead_of_emulating_them_wrongly():
    from minitron.pruning.masked_eval import masked_plan

    with pytest.raises(ValueError, match="mixture-of-experts"):
        with masked_plan(make_moe_model("mixtral"), PrunePlan(hidden=torch.arange(40))):
            pass


def test_unsupported_architecture_lists_the_moe_families():
    import transformers as tf

    model = tf.OlmoeForCausalLM(tf.OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                               num_attention_heads=4, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(ValueError, match="unsupported architecture.*mixtral.*qwen2_moe.*qwen3_moe"):
        get_adapter(model)
