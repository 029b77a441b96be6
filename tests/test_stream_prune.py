"""``minitron.prune_checkpoint`` / ``minitron prune --stream`` (issue #22): the checkpoint-streamed path.

Streamed calibration equals ``collect_importance`` on the loaded model; the streamed prune writes the
same tensors as ``prune`` + ``save_pretrained`` (row chunks forced small, several shards); the
output-folder rules hold; what the path cannot do is refused in one line, writing nothing.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import minitron
from minitron.cli import main
from minitron.streaming import CheckpointReader, skeleton, streamed_importance
from minitron.streaming import calibrate as calibrate_mod
from minitron.streaming import write as write_mod
from tests.helpers import FAMILY_NAMES, make_model, make_moe_model, save_checkpoint
from tests.test_offload import assert_same_scores

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMPORTANCE = minitron.ImportanceConfig(batch_size=4)


@pytest.fixture
def small_chunks(monkeypatch):
    """Row chunks of a few rows: every tensor is read, gathered and written in several pieces."""
    monkeypatch.setattr(write_mod, "CHUNK_BYTES", 512)
    monkeypatch.setattr(calibrate_mod, "ROW_CHUNK_BYTES", 512)


def checkpoint(tmp_path, family: str, name: str = "src"):
    path = tmp_path / name
    make_model(family).save_pretrained(path, max_shard_size="100KB")  # several shards
    return path


def target_for(config) -> minitron.Target:
    """Every dense axis pruned: hidden, FFN, heads (per KV group), depth."""
    heads = 4 if config.num_key_value_heads == 2 else 6
    target = minitron.Target(hidden_size=36, intermediate_size=40, num_attention_heads=heads, num_hidden_layers=3)
    try:
        target.validate(config)
    except ValueError:  # a family whose config ties hidden to heads * head_dim
        target = minitron.Target(intermediate_size=40, num_attention_heads=heads, num_hidden_layers=3)
    return target


def assert_same_checkpoint(a, b, ids) -> None:
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(ma(input_ids=ids).logits, mb(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_streamed_calibration_equals_collect_importance(tmp_path, family, calib_ids, small_chunks):
    src = checkpoint(tmp_path, family)
    config = minitron.ImportanceConfig(batch_size=3, head_output=True, sink_tokens=1, seq_agg="l2")
    reader = CheckpointReader(src)
    streamed = streamed_importance(reader, skeleton(src, None, reader), calib_ids, config, progress=False)
    loaded = minitron.collect_importance(AutoModelForCausalLM.from_pretrained(src), calib_ids, config, progress=False)
    assert_same_scores(streamed, loaded)
    for site in loaded.sums:  # not only close: the same activations reach every site
        assert all(torch.equal(x, y) for x, y in zip(loaded.sums[site], streamed.sums[site])), site


@pytest.mark.parametrize("family", sorted(FAMILY_NAMES))
def test_streamed_prune_equals_in_memory_prune(tmp_path, family, calib_ids, small_chunks):
    src = checkpoint(tmp_path, family)
    model = AutoModelForCausalLM.from_pretrained(src)
    target = target_for(model.config)
    options = dict(importance=IMPORTANCE, depth_metric="bi", progress=False)
    minitron.prune(model, calib_ids, target, inplace=True, **options).save_pretrained(tmp_path / "memory")
    out = minitron.prune_checkpoint(src, tmp_path / "stream", calib_ids, target, max_shard_size=40_000, **options)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert_same_checkpoint(tmp_path / "memory", out, calib_ids)


@pytest.mark.parametrize("family", ["llama_mha_untied", "gemma2"])
def test_streamed_layer_drop_losses_equal_the_in_memory_ones(tmp_path, family, calib_ids, small_chunks):
    from minitron.importance.ablation import layer_drop_losses
    from minitron.streaming.depth import streamed_layer_drop_losses

    src = checkpoint(tmp_path, family)
    reader = CheckpointReader(src)
    base, losses = streamed_layer_drop_losses(reader, skeleton(src, None, reader), calib_ids, 4, progress=False)
    model = AutoModelForCausalLM.from_pretrained(src)
    torch.testing.assert_close(losses, layer_drop_losses(model, calib_ids, 4), rtol=1e-6, atol=1e-6)
    assert base == pytest.approx(minitron.lm_loss(model, calib_ids, 4), rel=1e-6)


def test_depth_ppl_streams_or_falls_back_and_given_scores_are_used(tmp_path, calib_ids, caplog):
    src = checkpoint(tmp_path, "qwen2")
    model = AutoModelForCausalLM.from_pretrained(src)
    target = minitron.Target(num_hidden_layers=2, num_attention_heads=4)
    scores = minitron.collect_importance(model, calib_ids, minitron.ImportanceConfig(batch_size=4, depth_ppl=True,
                                                                                     head_output=True), progress=False)
    assert not torch.equal(scores.depth("ppl").argsort(), scores.depth("bi").argsort())  # the criteria differ here
    # the default depth_metric='ppl' streams: the in-memory prune's layers and tensors
    minitron.prune_checkpoint(src, tmp_path / "ppl", calib_ids, target, importance=IMPORTANCE, progress=False)
    minitron.prune(model, calib_ids, target, importance=IMPORTANCE, progress=False).save_pretrained(tmp_path / "ppl_m")
    assert_same_checkpoint(tmp_path / "ppl_m", tmp_path / "ppl", calib_ids)
    # over its memory budget: Block Importance, said in a warning
    with caplog.at_level(logging.WARNING, logger="minitron"):
        minitron.prune_checkpoint(src, tmp_path / "bi", calib_ids, target, importance=IMPORTANCE, ppl_memory=0,
                                  progress=False)
    assert "> ppl_memory=0.00 GiB" in caplog.text and "(depth_metric='bi') instead" in caplog.text
    minitron.prune(model, calib_ids, target, importance=IMPORTANCE, depth_metric="bi",
                   progress=False).save_pretrained(tmp_path / "bi_m")
    assert_same_checkpoint(tmp_path / "bi_m", tmp_path / "bi", calib_ids)
    # scores holding layer-drop losses (e.g. calibrated on an offloaded model) are used as they are
    minitron.prune_checkpoint(src, tmp_path / "given", None, target, scores=scores, progress=False)
    minitron.prune(model, None, target, scores=scores, progress=False).save_pretrained(tmp_path / "given_m")
    assert_same_checkpoint(tmp_path / "given_m", tmp_path / "given", calib_ids)


def test_params_budget_uses_the_scaled_shape(tmp_path, calib_ids, caplog):
    src = checkpoint(tmp_path, "llama")
    with caplog.at_level(logging.WARNING, logger="minitron"):
        out = minitron.prune_checkpoint(src, tmp_path / "p", calib_ids, params=0.6, importance=IMPORTANCE,
                                        progress=False)
    assert "target_for_budget" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(src)
    expected = minitron.target_for_budget(model, 0.6)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert (pruned.config.hidden_size, pruned.config.intermediate_size) == \
        (expected.hidden_size, expected.intermediate_size)
    assert minitron.count_parameters(pruned) <= 0.6 * minitron.count_parameters(model)


def test_output_folder_rules(tmp_path, calib_ids):
    src = save_checkpoint(tmp_path / "src", "llama")
    target = minitron.Target(intermediate_size=40)
    args = dict(importance=IMPORTANCE, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"dst_dir .*foreign is not empty and was not written by `minitron prune`.*"
                                         r"overwrite=True"):
        minitron.prune_checkpoint(src, foreign, calib_ids, target, **args)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="lies inside the input"):
        minitron.prune_checkpoint(src, src / "out", calib_ids, target, **args)
    # overwrite: minitron's files moved in, the user's file left alone
    minitron.prune_checkpoint(src, foreign, calib_ids, target, overwrite=True, **args)
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "config.json").is_file()
    # a previous prune output is replaced as a whole; tokenizer files are copied from the source
    out = tmp_path / "out"
    minitron.prune_checkpoint(src, out, calib_ids, target, **args)
    minitron.prune_checkpoint(src, out, calib_ids, minitron.Target(intermediate_size=32), **args)
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 32
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / ".minitron-output.json").read_text())["kind"] == "prune"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".minitron-")]  # no temp folder left


def test_refusals_write_nothing(tmp_path, calib_ids):
    target = minitron.Target(intermediate_size=32)
    moe = tmp_path / "moe"
    make_moe_model("mixtral").save_pretrained(moe)
    with pytest.raises(ValueError, match=r"mixture-of-experts checkpoints \(mixtral\) .* minitron.prune\(model, "):
        minitron.prune_checkpoint(moe, tmp_path / "o1", calib_ids, target, progress=False)
    bad = tmp_path / "nan"
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(bad)
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.up_proj.weight holds NaN/inf"):
        minitron.prune_checkpoint(bad, tmp_path / "o2", calib_ids, target, progress=False)
    with pytest.raises(ValueError, match=r"holds NaN/inf values; .* \(nothing was written\)"):
        minitron.prune_checkpoint(bad, tmp_path / "o3", None, target, method="random", progress=False)
    pickled = tmp_path / "bin"
    pickled.mkdir()  # a pickle checkpoint: never unpickled
    (pickled / "config.json").write_text((bad / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="holds no safetensors weights"):
        minitron.prune_checkpoint(pickled, tmp_path / "o4", calib_ids, target, progress=False)
    truncated = tmp_path / "truncated"
    make_model("llama").save_pretrained(truncated, max_shard_size="100KB")
    shard = sorted(truncated.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{shard} is corrupt or truncated"):
        minitron.prune_checkpoint(truncated, tmp_path / "o5", calib_ids, target, progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_cli_stream(tmp_path, capsys):
    out = tmp_path / "pruned"
    fast = ["--model", "builtin-tiny", "--num-samples", "8", "--seq-len", "64", "--no-progress"]
    scores = tmp_path / "scores.safetensors"
    assert main(["prune", *fast, "--stream", "--hidden-size", "192", "--ffn", "512", "--layers", "6",
                 "--depth-metric", "bi", "--out", str(out), "--save-scores", str(scores)]) == 0
    report = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert report["streamed"] and report["params_after"] < report["params_before"]
    assert report["config"]["hidden_size"] == 192 and report["config"]["num_hidden_layers"] == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 512 and (out / "tokenizer.json").is_file()
    # one streamed calibration, another target
    assert minitron.ImportanceScores.load(scores).meta["num_samples"] == 8
    assert main(["prune", *fast, "--stream", "--load-scores", str(scores), "--ffn", "256", "--out",
                 str(tmp_path / "again")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-2])["config"]["intermediate_size"] == 256
    assert main(["prune", *fast, "--stream", "--inplace", "--ffn", "512", "--out", str(tmp_path / "x")]) == 2
    assert "--stream cannot be combined with --inplace" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_streams_when_the_model_does_not_fit(tmp_path, capsys, monkeypatch):
    import minitron.cli.prune as cli_prune

    fast = ["--model", "builtin-tiny", "--num-samples", "8", "--seq-len", "64", "--no-progress", "--ffn", "512",
            "--depth-metric", "bi"]
    monkeypatch.setattr(cli_prune, "_available_bytes", lambda device: 16 << 20)  # 16 MiB free: 7.3M fp32 do not fit
    assert main(["prune", *fast, "--out", str(tmp_path / "auto")]) == 0
    captured = capsys.readouterr()
    assert "needs ~28 MiB in float32 but 16 MiB are available: pruning the checkpoint layer by layer" in captured.err
    assert json.loads([line for line in captured.out.splitlines() if line.startswith("{")][-1])["streamed"]
    monkeypatch.setattr(cli_prune, "_available_bytes", lambda device: 64 << 30)
    assert main(["prune", *fast, "--out", str(tmp_path / "memory")]) == 0
    assert "streamed" not in json.loads([line for line in capsys.readouterr().out.splitlines()
                                         if line.startswith("{")][-1])
