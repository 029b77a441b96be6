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


def test_prune_cli_rejects_bad_combinations_before_work(tmp_path, capsys):
    import pytest

    out = tmp_path / "o"
    assert main(["prune", "--params", "0.5", "--hidden-size", "128", "--out", str(out), *FAST]) == 2
    assert "--params cannot be combined with --hidden-size" in capsys.readouterr().err
    assert main(["prune", "--model", "builtin-tiny", "--seq-len", "1024", "--out", str(out), "--num-samples", "8",
                 "--no-progress"]) == 2
    assert "--seq-len=1024 exceeds the model's max_position_embeddings=512" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--num-samples", "-3", "--out", str(out)])
    assert "expected an integer >= 1, got -3" in capsys.readouterr().err
    garbage = tmp_path / "scores.safetensors"
    garbage.write_text("{not scores")
    assert main(["prune", "--load-scores", str(garbage), "--out", str(out), *FAST]) == 2
    assert f"{garbage} is not a readable minitron importance file" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["prune", "--device", "cuda", "--out", str(out), *FAST]) == 2
        assert "--device cuda: no CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_prune_cli_names_a_corrupt_weights_file(tmp_path, capsys):
    import shutil

    from minitron.data import BUILTIN_MODEL

    model = tmp_path / "model"
    model.mkdir()
    for f in BUILTIN_MODEL.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, model / f.name)
    (model / "model.safetensors").write_bytes((BUILTIN_MODEL / "model.safetensors").read_bytes()[:4096])
    assert main(["prune", *FAST, "--model", str(model), "--out", str(tmp_path / "o")]) == 2
    assert f"{model / 'model.safetensors'} is corrupt or truncated" in capsys.readouterr().err


def test_distill_builtin_job_defaults_run(tmp_path, capsys):
    """`minitron distill` with no student/data: the teacher pruned in-process, built-in text, report + final/.

    Scored on the manual's held-out split (``--eval-data builtin``): the 7M built-in model was trained on the
    manual only, so on the other built-in texts it and its pruned half are both near-random (~800 ppl) and
    "pruning raised the perplexity" would be noise there."""
    out = tmp_path / "run"
    assert main(["distill", "--teacher", "builtin-tiny", "--num-samples", "4", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "64", "--eval-data", "builtin", "--no-progress", "--no-plot", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    report = last_json(text)
    assert "pruning the teacher to params=0.5" in text and "held-out perplexity" in text
    assert report["student_ppl_before"] > report["teacher_ppl"] > 1 and report["student_ppl_after"] > 1
    import minitron
    from minitron.models import load_model

    student = AutoModelForCausalLM.from_pretrained(out / "final")
    teacher, _ = load_model("builtin-tiny")
    assert minitron.count_parameters(student) <= 0.5 * minitron.count_parameters(teacher)
    assert (out / "final" / "tokenizer.json").exists()


def test_prune_criteria_flags(tmp_path, capsys, monkeypatch):
    import minitron
    from minitron.data import BUILTIN_MODEL

    seen = []
    real = minitron.prune
    monkeypatch.setattr(minitron, "prune", lambda *a, **k: seen.append(k["config"]) or real(*a, **k))
    scores = tmp_path / "scores.safetensors"
    assert main(["prune", "--heads", "4", "--hidden-size", "192", "--layers", "7", "--head-metric", "loss",
                 "--no-head-residual", "--no-norm-rescale", "--depth-metric", "bi", "--depth-mode", "contiguous",
                 "--save-scores", str(scores), "--out", str(tmp_path / "h"), *FAST]) == 0
    config = last_json(capsys.readouterr().out)["config"]
    assert (config["num_attention_heads"], config["hidden_size"], config["num_hidden_layers"]) == (4, 192, 7)
    cfg = seen[0]
    assert (cfg.head_metric, cfg.head_residual, cfg.norm_rescale, cfg.depth_metric, cfg.depth_mode) == \
        ("loss", False, False, "bi", "contiguous")
    # and their effects: head-drop losses calibrated (--head-metric loss), no layer-drop losses (--depth-metric bi)
    saved = minitron.ImportanceScores.load(scores)
    assert saved.head_loss is not None and saved.ppl_loss is None
    # no norm rescale and no head residual: every kept weight value is an original one, unscaled and unfolded
    original = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert torch.isin(pruned.model.norm.weight, original.model.norm.weight).all()
    kept = pruned.model.layers[0].self_attn.o_proj.weight
    assert torch.isin(kept, torch.cat([l.self_attn.o_proj.weight.flatten() for l in original.model.layers])).all()


def test_prune_depth_rounds_flag(tmp_path, capsys):
    assert main(["prune", "--layers", "6", "--depth-rounds", "2", "--out", str(tmp_path / "d"), *FAST]) == 0
    assert last_json(capsys.readouterr().out)["config"]["num_hidden_layers"] == 6
    assert main(["prune", "--layers", "6", "--depth-rounds", "2", "--depth-metric", "bi", "--out",
                 str(tmp_path / "e"), *FAST]) == 2
    assert "--depth-rounds=2 needs --depth-metric ppl" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_budget_and_divisor_flags_are_checked(tmp_path, capsys):
    import pytest

    assert main(["prune", "--params", "1.5", "--out", str(tmp_path / "p"), *FAST]) == 2
    assert "params=1.5 is read as an absolute parameter count (values > 1 are counts" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--hidden-divisor", "0", "--out", str(tmp_path / "s")])
    assert exit_.value.code == 2 and "--hidden-divisor: expected an integer >= 1, got 0" in capsys.readouterr().err
