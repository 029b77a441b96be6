"""masked_plan: the unpruned model under hooks computes exactly what the pruned copy computes."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import make_model

import minitron
from minitron.pruning.budget import choose_budget_target
from minitron.evaluation import lm_loss
from minitron.pruning.masked_eval import masked_plan
from minitron.pruning import PrunePlan, Target, apply_plan, make_plan

TARGETS = [
    Target(hidden_size=36),
    Target(intermediate_size=40),
    Target(num_attention_heads=4),
    Target(hidden_size=24, intermediate_size=56, num_attention_heads=4),
]


def _scores(model, ids):
    return minitron.collect_importance(model, ids, minitron.ImportanceConfig(batch_size=4, head_output=True), progress=False)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "-".join(f"{k}={v}" for k, v in vars(t).items() if v))
def test_masked_plan_equals_the_pruned_copy(family, calib_ids, target):
    model = make_model(family)
    if target.num_attention_heads and model.config.num_key_value_heads == 6:  # MHA: heads come with whole groups
        pytest.skip("query-head pruning of an MHA model drops KV groups, which masked_plan does not emulate")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(_scores(model, calib_ids), target, model.config, head_residual=False)  # norm rescale on
    if target.hidden_size and family != "starcoder2":
        assert plan.norm_scale and any(abs(f - 1) > 1e-3 for f in plan.norm_scale.values())
    expected_logits = apply_plan(model, plan)(calib_ids).logits
    with masked_plan(model, plan):
        logits = model(calib_ids).logits
        loss = lm_loss(model, calib_ids, batch_size=4)
    torch.testing.assert_close(logits, expected_logits, atol=2e-5, rtol=1e-4)
    assert loss == pytest.approx(lm_loss(apply_plan(model, plan), calib_ids, batch_size=4), rel=1e-5)
    # the hooks are gone and the weights untouched
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not torch.allclose(model(calib_ids).logits, expected_logits, atol=1e-3)


def test_masked_plan_refuses_what_it_cannot_emulate():
    model = make_model("llama")
    for plan in (PrunePlan(layers=torch.tensor([0, 2])), PrunePlan(kv_groups={0: torch.tensor([0])}),
                 PrunePlan(heads={0: torch.tensor([0, 1, 3, 4])}, head_residual=True)):
        with pytest.raises(ValueError, match="apply_plan"):
            with masked_plan(model, plan):
                pass


def test_budget_candidates_score_the_same_masked_or_copied(calib_ids):
    model = make_model("qwen2")
    scores = _scores(model, calib_ids)
    copied = choose_budget_target(model, 0.6, scores, calib_ids, hidden_divisor=6, batch_size=4, masked=False)
    masked = choose_budget_target(model, 0.6, scores, calib_ids, hidden_divisor=6, batch_size=4, masked=True)
    assert copied[0] == masked[0] and len(copied[1]) == 5
    for a, b in zip(copied[1], masked[1]):
        assert a.target == b.target and a.loss == pytest.approx(b.loss, rel=1e-5)
    assert len({round(c.loss, 4) for c in copied[1]}) == 5  # the candidates differ: the comparison has teeth


@pytest.mark.parametrize("inplace", [True, False])
def test_params_prune_builds_no_candidate_copy(calib_ids, monkeypatch, inplace):
    """prune(params=...) scores its candidate shapes without a pruned copy (the peak stays at model +
    result) and lands on the same model as scoring copies does."""
    import minitron.pruning.budget
    import minitron.pruner

    with monkeypatch.context() as m:  # the reference: candidates scored as pruned copies
        original = minitron.pruning.budget.choose_budget_target
        m.setattr(minitron.pruner, "choose_budget_target",
                  lambda *a, **k: original(*a, **{**k, "masked": False}))
        expected = minitron.prune(make_model("llama"), calib_ids, params=0.6, seq_len=16, verbose=False)
    model = make_model("llama")

    def no_copy(*args, **kwargs):
        raise AssertionError("a budget candidate was built as a pruned copy")

    monkeypatch.setattr(minitron.pruning.budget, "apply_plan", no_copy)
    pruned = minitron.prune(model, calib_ids, params=0.6, seq_len=16, inplace=inplace, verbose=False)
    assert (pruned is model) == inplace and pruned.config.hidden_size == expected.config.hidden_size
    torch.testing.assert_close(pruned(calib_ids).logits, expected(calib_ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile_bytes,max_tokens", [(64 * 4 * 7, 7), (16 << 20, 4096), (1, 3)])
def test_vocab_tiled_cross_entropy_equals_full_logits(dtype, tile_bytes, max_tokens):
    """Evaluation's cross-entropy: vocabulary tiles (odd sizes, tails, a label in every tile,
    ignored tokens) give the full-logits value; bf16 weights are upcast per slice."""
    import torch.nn.functional as F

    from minitron.losses.cross_entropy import cross_entropy_sum_vocab_tiled

    g = torch.Generator().manual_seed(0)
    N, H, V = 23, 6, 301  # 301 rows: tiles of 64 leave a tail of 45
    h = torch.randn(N, H, generator=g).to(dtype)
    w = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 11]] = -100
    y[3], y[4] = 0, V - 1
    ref = F.cross_entropy(h.float() @ w.float().t() + b.float(), y, ignore_index=-100, reduction="sum")
    got = cross_entropy_sum_vocab_tiled(h, w, y, b, tile_bytes=tile_bytes, max_tokens=max_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_lm_loss_of_a_memory_mapped_checkpoint_drops_lm_head_pages(tmp_path):
    """Evaluation of a stock-loaded (memory-mapped) checkpoint: the same loss as full logits, and the
    lm_head's file pages are not left resident (they would sit on top of prune()'s peak)."""
    import sys

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from minitron.ops import mapped

    if not sys.platform.startswith("linux"):
        pytest.skip("memory maps via /proc (Linux)")
    config = LlamaConfig(vocab_size=8300, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    weight = model.get_output_embeddings().weight  # (8300, 256) fp32 = 8.1 MiB, tied to the embedding
    if mapped.file_mapping(weight) is None:
        pytest.skip("transformers did not memory-map this checkpoint")
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits  # (2, 16, V): reads every row
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
    assert mapped.resident_bytes(weight) > weight.numel() * weight.element_size() // 2
    assert lm_loss(model, ids, batch_size=2) == pytest.approx(float(expected), rel=1e-5)
    assert 0 <= mapped.resident_bytes(weight) < weight.numel() * weight.element_size() // 4
