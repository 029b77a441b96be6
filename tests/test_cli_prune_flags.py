"""``minitron prune`` flags reach the library: the command builds a Target / PruneConfig and calls
``minitron.prune`` once (no calibration of its own), and each flag changes what that call does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import minitron
from minitron.cli import main
from minitron.data import BUILTIN_MODEL
from tests.helpers import write_tiny_gguf

FAST = ["--model", "builtin-tiny", "--num-samples", "4", "--seq-len", "32", "--eval-samples", "1", "--no-progress"]


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.fixture
def prune_calls(monkeypatch):
    """Every ``minitron.prune`` call the command makes: its arguments, and the model it got and returned."""
    calls = []
    real = minitron.prune

    def spy(model, *args, **kwargs):
        calls.append({"model": model, "args": args, **kwargs})
        calls[-1]["result"] = real(model, *args, **kwargs)
        return calls[-1]["result"]

    monkeypatch.setattr(minitron, "prune", spy)

    def calibrated_outside(*a, **k):
        raise AssertionError("the command calibrated by itself instead of inside minitron.prune")

    monkeypatch.setattr(minitron, "collect_importance", calibrated_outside)
    return calls


def test_prune_calls_the_library_once_with_the_heap_trimmed(tmp_path, capsys, prune_calls, monkeypatch):
    import minitron.pruner as pruner

    trimmed = []
    real_trimmed = pruner.trimmed_layers
    monkeypatch.setattr(pruner, "trimmed_layers", lambda layers: trimmed.append(1) or real_trimmed(layers))
    finite = []
    real_finite = pruner.check_finite_weights
    monkeypatch.setattr(pruner, "check_finite_weights", lambda *a, **k: finite.append(1) or real_finite(*a, **k))
    assert main(["prune", "--num-attention-heads", "4", "--output-dir", str(tmp_path / "o"), *FAST]) == 0
    assert len(prune_calls) == 1 and isinstance(prune_calls[0]["config"], minitron.PruneConfig)
    assert prune_calls[0]["config"].num_samples == 4 and prune_calls[0]["config"].seq_len == 32
    assert trimmed and finite == [1]  # calibration under trimmed_layers; the weights scanned once


def test_inplace_flag(tmp_path, capsys, prune_calls):
    assert main(["prune", "--num-hidden-layers", "7", "--depth-metric", "bi", "--inplace",
                 "--output-dir", str(tmp_path / "a"), *FAST]) == 0
    assert prune_calls[-1]["inplace"] is True and prune_calls[-1]["result"] is prune_calls[-1]["model"]
    assert last_json(capsys.readouterr().out)["inplace"] is True
    assert main(["prune", "--num-hidden-layers", "7", "--depth-metric", "bi", "--output-dir", str(tmp_path / "b"),
                 *FAST]) == 0
    assert prune_calls[-1]["result"] is not prune_calls[-1]["model"]
    assert last_json(capsys.readouterr().out)["inplace"] is False


def test_aggregation_flags(tmp_path, capsys, prune_calls):
    scores = {}
    for name, flags in (("default", []), ("agg", ["--seq-agg", "l2", "--batch-agg", "mean"])):
        path = tmp_path / f"{name}.safetensors"
        assert main(["prune", "--intermediate-size", "512", "--save-scores", str(path), *flags,
                     "--output-dir", str(tmp_path / name), *FAST]) == 0
        scores[name] = minitron.ImportanceScores.load(path)
    importance = prune_calls[-1]["config"].importance
    assert (importance.seq_agg, importance.batch_agg) == ("l2", "mean")
    assert scores["agg"].batch_agg == "mean" and scores["default"].batch_agg == "l2"
    # the sequence aggregation changes the calibrated sums themselves (L2 over positions vs their mean)
    assert not torch.allclose(scores["agg"].sums["mlp.0"][0], scores["default"].sums["mlp.0"][0])


def test_dtype_flag(tmp_path, capsys, prune_calls):
    assert main(["prune", "--intermediate-size", "512", "--dtype", "bfloat16", "--output-dir", str(tmp_path / "o"),
                 *FAST]) == 0
    assert prune_calls[-1]["model"].dtype == torch.bfloat16
    assert last_json(capsys.readouterr().out)["dtype"] == "bfloat16"
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_gguf_flag(tmp_path, capsys, prune_calls):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    write_tiny_gguf(folder / "a.gguf", seed=0)
    assert main(["prune", "--model", str(folder), "--gguf", "a.gguf", "--intermediate-size", "64",
                 "--num-samples", "2", "--seq-len", "32", "--no-progress", "--output-dir", str(tmp_path / "o")]) == 0
    assert prune_calls[-1]["model"].config.hidden_size == 64  # the GGUF's model, not some other
    assert last_json(capsys.readouterr().out)["config"]["intermediate_size"] == 64
    assert main(["prune", "--model", str(folder), "--gguf", "missing.gguf", "--intermediate-size", "64",
                 "--output-dir", str(tmp_path / "p")]) == 2  # the name is used: a missing file is refused


def test_chat_template_flag(tmp_path, capsys, prune_calls, monkeypatch):
    import minitron.pruner as pruner

    model_dir = tmp_path / "chat-model"
    shutil.copytree(BUILTIN_MODEL, model_dir)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    blocks = {}
    real = pruner.load_text_blocks

    def record(*args, **kwargs):
        out = real(*args, **kwargs)
        blocks[kwargs.get("chat_template", False)] = out
        return out

    monkeypatch.setattr(pruner, "load_text_blocks", record)
    common = ["prune", "--model", str(model_dir), "--intermediate-size", "512", "--num-samples", "2", "--seq-len", "32",
              "--no-progress"]
    assert main([*common, "--chat-template", "--output-dir", str(tmp_path / "a")]) == 0
    assert prune_calls[-1]["config"].chat_template is True
    assert main([*common, "--output-dir", str(tmp_path / "b")]) == 0
    assert set(blocks) == {True, False} and not torch.equal(blocks[True], blocks[False])  # the template's tokens


def test_deprecated_aliases_and_canonical_names(tmp_path, capsys, prune_calls):
    assert main(["prune", "--ffn", "512", "--heads", "4", "--calib", "builtin", "--out", str(tmp_path / "old"),
                 *FAST]) == 0
    old = last_json(capsys.readouterr().out)
    assert main(["prune", "--intermediate-size", "512", "--num-attention-heads", "4", "--data", "builtin",
                 "--output-dir", str(tmp_path / "new"), *FAST]) == 0
    assert last_json(capsys.readouterr().out)["config"] == old["config"]
    assert prune_calls[0]["target"] == prune_calls[1]["target"]  # the same Target
    help_text = minitron.cli.build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "--out: deprecated alias" in help_text and "--calib: deprecated alias" in help_text


def test_bad_options_refused_before_loading(tmp_path, capsys, prune_calls):
    assert main(["prune", "--depth-rounds", "2", "--depth-metric", "bi", "--output-dir", str(tmp_path / "o"),
                 *FAST]) == 2
    assert "--depth-rounds=2 needs --depth-metric ppl" in capsys.readouterr().err
    assert prune_calls == [] and not (tmp_path / "o").exists()


def test_search_axes_take_the_target_field_names():
    from minitron.arch_search import SearchConfig
    from minitron.cli import build_parser

    by_field = SearchConfig(axes=("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"))
    assert by_field.axes == SearchConfig(axes=("hidden", "ffn", "heads", "layers")).axes
    assert SearchConfig(axes=("num_experts", "expert_intermediate_size", "shared_expert_intermediate_size")).axes == \
        ("experts", "expert_ffn", "shared_ffn")
    args = build_parser().parse_args(["search", "--out", "x", "--calib", "a.txt", "--train", "b.txt", "--eval", "c.txt"])
    assert (args.output_dir, args.data, args.train_data, args.eval_data) == ("x", "a.txt", "b.txt", "c.txt")
    help_text = build_parser()._subparsers._group_actions[0].choices["search"].format_help()
    assert "minitron.SearchConfig's default: 100" in help_text  # --retrain-steps: the API's default is said
