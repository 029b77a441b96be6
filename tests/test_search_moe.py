"""minitron.search on mixture-of-experts models: the experts / expert-FFN / shared-FFN axes, exact
parameter counts, and a search that prunes experts end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import minitron
from minitron.arch_search import ParamCounter, SearchConfig, default_divisors, enumerate_candidates, model_axes, search
from minitron.pruning.target import model_sizes
from minitron.pruning.params import target_parameters

from tests.helpers import MOE_COMMON, MOE_FAMILY_NAMES, make_model, make_moe_model

MOE_FIELDS = ("num_experts", "expert_intermediate_size", "shared_expert_intermediate_size")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_model_axes_and_divisors():
    assert model_axes(make_model("llama").config) == ("hidden", "ffn", "heads", "layers")
    assert "num_experts" not in default_divisors(make_model("llama").config)
    # Mixtral's intermediate_size IS the expert FFN: searched once, as expert_ffn
    assert model_axes(make_moe_model("mixtral").config) == ("hidden", "heads", "layers", "experts", "expert_ffn")
    assert model_axes(make_moe_model("qwen2_moe").config) == ("hidden", "ffn", "heads", "layers", "experts", "expert_ffn",
                                                          "shared_ffn")
    assert model_axes(make_moe_model("qwen3_moe").config) == ("hidden", "ffn", "heads", "layers", "experts", "expert_ffn")
    # a Qwen3-MoE whose every layer is sparse has no dense MLP to search
    import transformers as tf

    all_sparse = tf.Qwen3MoeConfig(**MOE_COMMON, head_dim=8, intermediate_size=88, moe_intermediate_size=40, num_experts=6,
                                   num_experts_per_tok=2)
    assert model_axes(all_sparse) == ("hidden", "heads", "layers", "experts", "expert_ffn")
    divs = default_divisors(make_moe_model("qwen2_moe").config)
    assert divs["num_experts"] == 1 and divs["expert_intermediate_size"] == 8
    assert divs["shared_expert_intermediate_size"] == 8


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_param_counter_exact_on_moe(family):
    model = make_moe_model(family)
    counter = ParamCounter(model)
    shared = model_sizes(model.config)["shared_expert_intermediate_size"] is not None
    targets = [minitron.Target(), minitron.Target(num_experts=4), minitron.Target(expert_intermediate_size=24),
               minitron.Target(hidden_size=40, num_attention_heads=4, num_hidden_layers=3, num_experts=3,
                               expert_intermediate_size=32),
               minitron.Target(num_hidden_layers=1, num_experts=2, expert_intermediate_size=8),
               minitron.Target(hidden_size=24, intermediate_size=56 if family != "mixtral" else None,
                               num_hidden_layers=2)]
    if shared:
        targets += [minitron.Target(shared_expert_intermediate_size=16),
                    minitron.Target(hidden_size=32, num_experts=5, expert_intermediate_size=16,
                                    shared_expert_intermediate_size=40)]
    for t in targets:
        assert counter(t) == target_parameters(model, t), t
        lo, hi = counter.bounds(t)
        assert lo <= counter(t) <= hi


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_mixed_dense_and_sparse_layers_counted_for_the_layers_kept(family):
    """Which layers (sparse or dense MLP) a depth-pruned candidate keeps is chosen by importance: the
    counter gives the exact count for each choice and bounds them; the pruned model lies inside."""
    model = make_moe_model(family)
    counter = ParamCounter(model)
    t = minitron.Target(num_hidden_layers=3, num_experts=4, expert_intermediate_size=24)
    lo, hi = counter.bounds(t)
    assert lo < hi  # a dense and a sparse layer differ in size
    exact = {counter(t, kept) for kept in ([0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3])}
    assert min(exact) == lo and max(exact) == hi
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, MOE_COMMON["vocab_size"], (4, 16), generator=g)
    pruned = minitron.prune(model, calib, t, seq_len=16, progress=False, verbose=False)
    assert minitron.count_parameters(pruned) in exact


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_enumeration_searches_the_moe_axes(family):
    model = make_moe_model(family)
    sizes = model_sizes(model.config)
    cands, budget = enumerate_candidates(model, 0.75, 0.1, divisors={"hidden": 8}, max_depth_prune=0.25)
    assert cands and len({c.name for c in cands}) == len(cands)  # no duplicates (Mixtral: ffn is the expert FFN)
    counter = ParamCounter(model)
    for c in cands:
        assert budget * 0.9 <= c.params <= budget
        assert c.params == counter.bounds(c.target)[1]
        if c.num_hidden_layers == MOE_COMMON["num_hidden_layers"] or family == "mixtral":
            assert c.params == target_parameters(model, c.target)
        assert 2 <= c.num_experts <= 6 and c.num_experts >= 6 * 0.6  # top-k 2, max_width_prune 0.4
        assert c.expert_intermediate_size % 8 == 0 and c.expert_intermediate_size >= 40 * 0.6
        assert f"-e{c.num_experts}-x{c.expert_intermediate_size}" in c.name
        if family == "mixtral":
            assert c.intermediate_size == c.expert_intermediate_size
        assert (c.shared_expert_intermediate_size is None) == (sizes["shared_expert_intermediate_size"] is None)
    # every MoE axis really is searched (the budget cannot be met by the dense axes alone here)
    assert any(c.num_experts < 6 for c in cands) and any(c.expert_intermediate_size < 40 for c in cands)
    if family == "qwen2_moe":
        assert any(c.shared_expert_intermediate_size < 56 for c in cands)
    # only the MoE axes: every candidate is the dense shape with fewer experts / narrower experts
    cands, _ = enumerate_candidates(model, 0.8, 0.2, axes=("experts", "expert_ffn"))
    assert cands and all((c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (48, 6, 4) for c in cands)
    assert all(c.params == target_parameters(model, c.target) for c in cands)
    assert min(c.num_experts for c in cands) < 6 and min(c.expert_intermediate_size for c in cands) < 40


def test_axes_the_model_lacks_are_refused():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no experts axis \(not a mixture-of-experts model\)"):
        enumerate_candidates(make_model("llama"), 0.8, axes=("experts",))
    with pytest.raises(ValueError, match=r"has no shared_ffn axis \(no shared expert\)"):
        enumerate_candidates(make_moe_model("qwen3_moe"), 0.8, axes=("shared_ffn",))
    with pytest.raises(ValueError, match="allowed axes are hidden, heads, layers, experts, expert_ffn"):
        enumerate_candidates(make_moe_model("mixtral"), 0.8, axes=("width",))
    # Mixtral: `ffn` names the same config field as `expert_ffn`
    mixtral = make_moe_model("mixtral")
    a, _ = enumerate_candidates(mixtral, 0.85, 0.1, axes=("ffn",))
    b, _ = enumerate_candidates(mixtral, 0.85, 0.1, axes=("expert_ffn",))
    assert [c.name for c in a] == [c.name for c in b] and {c.expert_intermediate_size for c in a} > set()
    assert all(c.num_experts == 6 for c in a)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_search_prunes_experts_end_to_end(family, tmp_path):
    model = make_moe_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, MOE_COMMON["vocab_size"], (8, 16), generator=g)
    train = torch.randint(0, MOE_COMMON["vocab_size"], (1200,), generator=g)
    valid = torch.randint(0, MOE_COMMON["vocab_size"], (4, 16), generator=g)
    axes = ("experts", "expert_ffn", "shared_ffn") if family == "qwen2_moe" else ("experts", "expert_ffn", "heads")
    res = search(model, calib, train, params=0.75, eval_data=valid, output_dir=tmp_path / "s", progress=False,
                 config=SearchConfig(tolerance=0.1, retrain_steps=2, top=2, axes=axes, seq_len=16, batch_size=4))
    cands = res.candidates
    assert len(cands) >= 3 and sorted(c.rank_pruned for c in cands) == list(range(1, len(cands) + 1))
    # the dense shape cannot reach 75%: every candidate prunes experts or their FFN
    assert all(c.num_experts < 6 or c.expert_intermediate_size < 40 for c in cands)
    best = res.best
    config = res.model.config
    sizes = model_sizes(config)
    assert {f: sizes[f] for f in MOE_FIELDS if getattr(best, f) is not None} == \
        {f: getattr(best, f) for f in MOE_FIELDS if getattr(best, f) is not None}
    assert minitron.count_parameters(res.model) == best.params <= res.budget
    assert minitron.lm_loss(res.model, valid, 4) == pytest.approx(best.loss_retrained, rel=1e-4)
    # report: the MoE columns and fields
    md = res.markdown()
    assert "| experts | expert FFN |" in md and best.name in md
    assert ("shared FFN" in md) == (family == "qwen2_moe")
    rows = json.loads((tmp_path / "s" / "candidates.json").read_text())["candidates"]
    assert rows[0]["num_experts"] is not None and ("shared_expert_intermediate_size" in rows[0]) == (family == "qwen2_moe")
    header = (tmp_path / "s" / "candidates.csv").read_text().splitlines()[0]
    assert "num_experts" in header and "expert_intermediate_size" in header
    # the best checkpoint reloads with stock transformers, same logits
    loaded = AutoModelForCausalLM.from_pretrained(res.files["best"]).eval()
    assert model_sizes(loaded.config) == sizes
    with torch.no_grad():
        torch.testing.assert_close(loaded(valid).logits, res.model(valid).logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher is untouched


def test_dense_rows_have_no_moe_fields():
    from minitron.arch_search import Candidate

    c = Candidate(48, 88, 6, 4, 1000)
    assert c.name == "h48-f88-a6-l4" and "num_experts" not in c.row()
    assert c.target == minitron.Target(48, 88, 6, 4)
    m = Candidate(48, 88, 6, 4, params=10, num_experts=4, expert_intermediate_size=24)
    assert m.name == "h48-f88-a6-l4-e4-x24" and m.row()["num_experts"] == 4
    assert "shared_expert_intermediate_size" not in m.row()


def test_moe_width_divisors_are_multiples_of_the_grouped_gemm_width():
    from minitron.arch_search.space import _normalise_divisors
    from minitron.pruning.target import MOE_WIDTH_MULTIPLE

    divs = _normalise_divisors(make_moe_model("qwen3_moe").config, {"hidden": 6, "expert_ffn": 4, "ffn": 4})
    assert divs["hidden_size"] % MOE_WIDTH_MULTIPLE == 0 and divs["hidden_size"] % 6 == 0
    assert divs["expert_intermediate_size"] % MOE_WIDTH_MULTIPLE == 0 and divs["intermediate_size"] == 4
    assert _normalise_divisors(make_model("llama").config, {"hidden": 6})["hidden_size"] == 6
