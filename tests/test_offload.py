"""Models dispatched by accelerate with cpu/disk offload (issue #22, the guards).

Each case of the issue's table on a tiny checkpoint loaded with ``device_map="auto"`` and a small
``max_memory`` (part offloaded to disk) or none at all (everything on disk): calibration statistics
and losses equal the in-memory model's; what cannot work on offloaded weights refuses in one line.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import minitron
from minitron.offload import execution_device, is_offloaded, offloaded_modules
from minitron.validate import check_finite_weights
from tests.helpers import make_model, make_moe_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEMORY = {"partial": {"cpu": "150KB"}, "disk": {}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in ("llama_mha_untied", "llama"):
        path = tmp_path_factory.mktemp(family)
        make_model(family).save_pretrained(path, max_shard_size="100KB")
        out[family] = path
    path = tmp_path_factory.mktemp("mixtral")
    make_moe_model("mixtral").save_pretrained(path, max_shard_size="100KB")
    out["mixtral"] = path
    return out


def load_offloaded(path, memory: str, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory=MEMORY[memory],
                                                 offload_folder=str(tmp_path / "offload"))
    assert is_offloaded(model) and offloaded_modules(model)
    return model


def assert_same_scores(a: minitron.ImportanceScores, b: minitron.ImportanceScores) -> None:
    assert a.sums.keys() == b.sums.keys() and a.counts == b.counts
    for site in a.sums:
        for x, y in zip(a.sums[site], b.sums[site]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.bi_cos_sum, b.bi_cos_sum)
    for name in ("ppl_loss", "head_loss"):
        if getattr(a, name) is not None or getattr(b, name) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)
    for site in a.norm_ms:
        torch.testing.assert_close(a.norm_ms[site], b.norm_ms[site])


@pytest.mark.parametrize("memory", sorted(MEMORY))
@pytest.mark.parametrize("family", ["llama_mha_untied", "llama"])
def test_calibration_and_losses_on_an_offloaded_model_equal_the_in_memory_run(checkpoints, family, memory, tmp_path,
                                                                               calib_ids):
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[family])
    model = load_offloaded(checkpoints[family], memory, tmp_path)
    assert execution_device(model) == torch.device("cpu")  # from the hooks, not a meta parameter
    # every loss- and weight-reading site: head output norms (o_proj), layer-drop and head-drop losses (lm_head)
    config = minitron.ImportanceConfig(batch_size=4, head_output=True, depth_ppl=True, head_loss=True,
                                       head_loss_blocks=2)
    assert_same_scores(minitron.collect_importance(model, calib_ids, config, progress=False),
                       minitron.collect_importance(ref, calib_ids, config, progress=False))
    assert minitron.lm_loss(model, calib_ids) == pytest.approx(minitron.lm_loss(ref, calib_ids), rel=1e-6)
    check_finite_weights(model)  # reads every offloaded weight from its store, module by module


def test_mixture_of_experts_calibration_on_an_offloaded_model(checkpoints, tmp_path, calib_ids):
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"])
    model = load_offloaded(checkpoints["mixtral"], "disk", tmp_path)
    config = minitron.ImportanceConfig(batch_size=4)
    assert_same_scores(minitron.collect_importance(model, calib_ids, config, progress=False),
                       minitron.collect_importance(ref, calib_ids, config, progress=False))


@pytest.mark.parametrize("memory", sorted(MEMORY))
def test_prune_and_search_refuse_an_offloaded_model_and_leave_it_intact(checkpoints, memory, tmp_path, calib_ids):
    model = load_offloaded(checkpoints["llama_mha_untied"], memory, tmp_path)
    with torch.no_grad():
        before = model(input_ids=calib_ids[:2]).logits
    with pytest.raises(ValueError, match=r"offloaded modules .*minitron.prune_checkpoint\(src_dir, dst_dir.*--stream"):
        minitron.prune(model, calib_ids, minitron.Target(intermediate_size=40), progress=False)
    with pytest.raises(ValueError, match=r"minitron.search: the model has .* offloaded"):
        minitron.search(model, calib_ids, calib_ids, 0.5)
    assert model.config.intermediate_size == 88
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib_ids[:2]).logits, before, rtol=0, atol=0)


def test_finite_weights_check_reads_offloaded_weights(tmp_path):
    model = make_model("llama_mha_untied")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    offloaded = load_offloaded(tmp_path / "ckpt", "disk", tmp_path)
    with pytest.raises(ValueError, match=r"weight model.layers.2.mlp.down_proj.weight holds NaN/inf"):
        check_finite_weights(offloaded)


def test_apply_plan_and_calibration_refuse_weights_without_data(checkpoints, tmp_path, calib_ids):
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    offloaded = load_offloaded(checkpoints["llama"], "partial", tmp_path)
    plan = minitron.random_plan(offloaded.config, minitron.Target(intermediate_size=40))
    with pytest.raises(ValueError, match=r"minitron.apply_plan: the model has .* offloaded modules"):
        minitron.apply_plan(offloaded, plan, inplace=True)
    assert offloaded.config.intermediate_size == 88
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoints["llama"]))
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is on the meta device with no offload hook"):
        minitron.collect_importance(skeleton, calib_ids, progress=False)
