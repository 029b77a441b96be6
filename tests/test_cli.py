"""The command line on the built-in model: explicit targets, budgets, saved scores, errors."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from minitron.cli import main

FAST = ["--model", "builtin-tiny", "--num-samples", "8", "--seq-len", "64", "--no-progress"]


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_prune_explicit_target_and_reload(tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    assert main(["prune", "--hidden-size", "192", "--ffn", "512", "--heads", "4", "--layers", "6",
                 "--out", str(out_dir), "--save-scores", str(tmp_path / "s.safetensors"), *FAST]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["config"] == {"hidden_size": 192, "intermediate_size": 512, "num_attention_heads": 4,
                                "num_hidden_layers": 6, "num_key_value_heads": 4, "head_dim": 32}
    assert report["ppl_after"] > 1 and report["params_after"] < report["params_before"]
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.hidden_size == 192 and model.config.head_dim == 32
    assert (out_dir / "tokenizer.json").exists()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())  # atomic write left no temp dir

    # one calibration, another target: reuse the saved scores
    assert main(["prune", "--layers", "4", "--depth-mode", "contiguous", "--load-scores", str(tmp_path / "s.safetensors"),
                 "--out", str(tmp_path / "depth"), *FAST]) == 0
    assert last_json(capsys.readouterr().out)["config"]["num_hidden_layers"] == 4


def test_prune_params_budget(tmp_path, capsys):
    assert main(["prune", "--params", "0.6", "--out", str(tmp_path / "p"), *FAST]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["params_after"] <= 0.6 * report["params_before"]


def test_prune_bad_target_exits_2(tmp_path, capsys):
    assert main(["prune", "--heads", "6", "--out", str(tmp_path / "x"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads=6 is not a multiple of num_key_value_heads=4" in err
    assert not (tmp_path / "x").exists()
    assert main(["prune", *FAST, "--model", str(tmp_path / "missing")]) == 2
    assert "model not found locally" in capsys.readouterr().err


def test_builtin_model_ships_and_is_trained():
    from minitron.models import load_model
    from minitron.data import builtin_text, load_text_blocks
    import minitron

    model, tok = load_model("builtin-tiny")
    valid = load_text_blocks([builtin_text("valid")], tok, 128)[:8]
    # far below the uniform-guess perplexity of the 4096-token vocabulary
    assert minitron.perplexity(model, valid) < 400
    assert torch.isfinite(model.model.embed_tokens.weight).all()


def test_prune_kv_groups_explicit(tmp_path, capsys):
    assert main(["prune", "--heads", "4", "--kv-heads", "2", "--out", str(tmp_path / "kv"), *FAST]) == 0
    config = last_json(capsys.readouterr().out)["config"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "kv")
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 32, 256)


def test_prune_criteria_flags(tmp_path, capsys):
    assert main(["prune", "--heads", "4", "--hidden-size", "192", "--head-metric", "loss", "--head-residual",
                 "--no-norm-rescale", "--depth-metric", "bi", "--out", str(tmp_path / "h"), *FAST]) == 0
    config = last_json(capsys.readouterr().out)["config"]
    assert (config["num_attention_heads"], config["hidden_size"]) == (4, 192)
