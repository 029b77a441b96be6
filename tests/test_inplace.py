"""In-place pruning of checkpoints loaded the way users load them (stock from_pretrained, memory-mapped).

- equals the copy path exactly (weights and logits), for every family and every axis;
- mutates the objects the caller already holds (model, submodules, parameters, config, hooks)
  instead of swapping ``model.__dict__``;
- leaves no pruned weight in the checkpoint's file mapping, and never warns about a copy fallback.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

import minitron
from minitron.ops import mapped
from minitron.pruning import Target, apply_plan, make_plan
from tests.helpers import make_model



def _target(config) -> Target:
    """Every axis pruned; 4 query heads = 2 per KV group (MHA models keep their heads)."""
    heads = 4 if config.num_key_value_heads == 2 else None
    return Target(hidden_size=36, intermediate_size=64, num_attention_heads=heads, num_hidden_layers=3)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def checkpoint(family, tmp_path):
    make_model(family).save_pretrained(tmp_path)
    return tmp_path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory maps via /proc (Linux)")
def test_inplace_prune_of_a_mapped_checkpoint_equals_the_copy(family, checkpoint, calib_ids):
    model = _load(checkpoint)
    embed = model.get_input_embeddings().weight
    assert not embed.untyped_storage().resizable() and mapped.file_mapping(embed) is not None  # the user's case
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=4, depth_ppl=True, head_output=True), progress=False)
    target = _target(model.config)
    target.validate(model.config)
    plan = make_plan(scores, target, model.config)
    copy = apply_plan(_load(checkpoint), plan)

    # objects a wrapper or a user holds before pruning
    config, layers = model.config, model.model.layers
    kept = plan.layers.tolist()
    layer = layers[kept[1]]  # becomes layer 1
    up_name = {"starcoder2": "c_fc", "phi3": "gate_up_proj"}.get(family, "up_proj")
    up_rows = 2 * 64 if family == "phi3" else 64  # Phi-3's fused rows are [gate | up]
    up = getattr(layer.mlp, up_name)
    calls = []
    up.register_forward_hook(lambda m, args, out: calls.append(out.shape))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CompactFallbackWarning: nothing falls back to a copy
        result = apply_plan(model, plan, inplace=True)
    assert result is model and model.config is config and model.model.layers is layers
    assert model.model.layers[1] is layer and getattr(layer.mlp, up_name) is up
    assert layer.self_attn.layer_idx == 1
    assert up.weight.shape == (up_rows, 36) and up.in_features == 36 and up.out_features == up_rows

    assert model.state_dict().keys() == copy.state_dict().keys()
    for key, value in copy.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    ids = calib_ids[:, :12]
    torch.testing.assert_close(_logits(model, ids), _logits(copy, ids), atol=0, rtol=0)
    assert calls and calls[-1][-1] == up_rows  # the hook registered before pruning still fires, on pruned weights
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    # every pruned weight left the file mapping (private memory holding the kept part only)
    for name, p in model.named_parameters():
        if p.shape != copy.state_dict()[name].shape or name.endswith(("embed_tokens.weight", "q_proj.weight", "qkv_proj.weight")):
            assert mapped.file_mapping(p) is None, name

    # KV-cache decoding uses the renumbered layers: incremental logits equal a full forward
    with torch.no_grad():
        out = model(input_ids=ids[:2, :8], use_cache=True)
        step = model(input_ids=ids[:2, 8:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, _logits(model, ids[:2])[:, 8:], atol=1e-5, rtol=1e-4)


def test_inplace_prune_api_semantics(tmp_path, calib_ids):
    """``prune(inplace=True)`` returns the input object pruned; a saved result reloads identically."""
    make_model("llama").save_pretrained(tmp_path / "in")
    model = _load(tmp_path / "in")
    attn = model.model.layers[0].self_attn
    q = attn.q_proj.weight  # the Parameter object itself
    model.gradient_checkpointing_enable()  # plain attributes set after construction must survive
    flags = {n: m.gradient_checkpointing for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")}
    assert any(flags.values())
    pruned = minitron.prune(model, calib_ids, Target(hidden_size=36, num_attention_heads=2), seq_len=16,
                            inplace=True, progress=False, verbose=False)
    assert pruned is model and model.model.layers[0].self_attn is attn and attn.q_proj.weight is q
    assert q.shape == (2 * 8, 36) and attn.num_key_value_groups == 1 and model.config.num_attention_heads == 2
    assert flags == {n: m.gradient_checkpointing for n, m in model.named_modules() if n in flags}
    pruned.save_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(_load(tmp_path / "out"), calib_ids), _logits(pruned, calib_ids), atol=0, rtol=0)
