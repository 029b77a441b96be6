"""The command line on tiny mixture-of-experts checkpoints: --experts / --expert-ffn / --shared-expert-ffn,
the refusals, and `minitron search` over the MoE axes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from minitron.cli import main
from minitron.pruning.target import model_sizes
from tests.helpers import MOE_COMMON, make_moe_model, save_checkpoint

FAST = ["--num-samples", "4", "--seq-len", "16", "--batch-size", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def moe_checkpoint(path: Path, family: str) -> Path:
    """A tiny MoE checkpoint with the built-in tokenizer's files (its ids exceed the tiny vocabulary:
    the data below are token ids)."""
    from minitron.data import BUILTIN_MODEL

    make_moe_model(family).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN_MODEL / name, path / name)
    return path


def token_file(path: Path, n_docs: int = 12, length: int = 40, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"input_ids": torch.randint(0, MOE_COMMON["vocab_size"], (length,), generator=g).tolist()}) + "\n")
    return path


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("family,flags,expect", [
    ("mixtral", ["--experts", "4", "--expert-ffn", "24", "--layers", "3"],
     {"num_experts": 4, "expert_intermediate_size": 24, "intermediate_size": 24, "num_hidden_layers": 3}),
    ("qwen2_moe", ["--experts", "3", "--expert-ffn", "32", "--shared-expert-ffn", "40", "--ffn", "64"],
     {"num_experts": 3, "expert_intermediate_size": 32, "shared_expert_intermediate_size": 40,
      "intermediate_size": 64}),
    ("qwen3_moe", ["--experts", "4", "--expert-ffn", "16", "--hidden-size", "40", "--heads", "4"],
     {"num_experts": 4, "expert_intermediate_size": 16, "hidden_size": 40, "num_attention_heads": 4}),
])
def test_prune_moe_flags_and_reload(tmp_path, capsys, family, flags, expect):
    model_dir = moe_checkpoint(tmp_path / "model", family)
    calib = token_file(tmp_path / "calib.jsonl")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--calib", str(calib), "--out", str(out), *flags, *FAST]) == 0
    stdout = capsys.readouterr().out
    report = last_json(stdout)
    assert {k: report["config"][k] for k in expect} == expect
    assert report["config"]["num_experts_per_tok"] == 2
    assert ("shared_expert_intermediate_size" in report["config"]) == (family == "qwen2_moe")
    assert report["params_after"] < report["params_before"]
    # stock transformers reloads it with the pruned sizes, the checkpoint's own config names included
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    sizes = model_sizes(loaded.config)
    assert {k: sizes[k] for k in expect} == expect
    experts_field = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(loaded.config, experts_field) == expect["num_experts"]
    sparse = next(layer for layer in loaded.model.layers if hasattr(layer.mlp, "experts"))
    assert sparse.mlp.gate.weight.shape[0] == expect["num_experts"]
    assert sparse.mlp.experts.down_proj.shape[0] == expect["num_experts"]
    assert sparse.mlp.experts.down_proj.shape[-1] == expect["expert_intermediate_size"]
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]
    ids = torch.randint(0, MOE_COMMON["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()
        assert loaded.generate(ids[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_prune_moe_random_method(tmp_path, capsys):
    model_dir = moe_checkpoint(tmp_path / "model", "qwen2_moe")
    out = tmp_path / "random"
    assert main(["prune", "--model", str(model_dir), "--method", "random", "--experts", "2",
                 "--shared-expert-ffn", "16", "--out", str(out), *FAST]) == 0
    config = last_json(capsys.readouterr().out)["config"]
    assert (config["num_experts"], config["shared_expert_intermediate_size"]) == (2, 16)
    assert model_sizes(AutoModelForCausalLM.from_pretrained(out).config)["num_experts"] == 2


def test_prune_moe_refusals_before_calibration(tmp_path, capsys):
    model_dir = moe_checkpoint(tmp_path / "model", "qwen3_moe")
    calib = token_file(tmp_path / "calib.jsonl")
    out = tmp_path / "o"
    base = ["prune", "--model", str(model_dir), "--calib", str(calib), "--out", str(out), *FAST]
    assert main([*base, "--params", "0.5", "--experts", "4"]) == 2
    assert "--params cannot be combined with" in capsys.readouterr().err
    # no target: the default --params budget does not apply to mixture-of-experts models
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--params (the default when no target is given)" in err and "--num-experts, --expert-intermediate-size" in err
    assert main([*base, "--params", "0.5"]) == 2
    assert "give explicit targets" in capsys.readouterr().err
    assert main([*base, "--experts", "1"]) == 2  # top-2 routing
    assert "num_experts=1 is fewer than num_experts_per_tok=2" in capsys.readouterr().err
    assert main([*base, "--shared-expert-ffn", "16"]) == 2
    assert "no shared expert" in capsys.readouterr().err
    assert main([*base, "--experts", "7"]) == 2
    assert "target larger than the model" in capsys.readouterr().err
    dense = save_checkpoint(tmp_path / "dense")
    assert main(["prune", "--model", str(dense), "--calib", str(calib), "--out", str(out), "--experts", "2",
                 *FAST]) == 2
    assert "not a mixture-of-experts model" in capsys.readouterr().err
    mixtral = moe_checkpoint(tmp_path / "mixtral", "mixtral")
    assert main(["prune", "--model", str(mixtral), "--calib", str(calib), "--out", str(out), "--ffn", "32",
                 "--expert-ffn", "24", *FAST]) == 2
    assert "name the same MixtralConfig field" in capsys.readouterr().err
    assert not out.exists()


def test_distill_without_student_refuses_moe_teacher(tmp_path, capsys):
    model_dir = moe_checkpoint(tmp_path / "model", "mixtral")
    assert main(["distill", "--teacher", str(model_dir), "--output-dir", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress"]) == 2
    assert "prune it first (`minitron prune --num-experts N" in capsys.readouterr().err


def test_search_cli_on_moe_checkpoint(tmp_path, capsys):
    model_dir = moe_checkpoint(tmp_path / "model", "qwen2_moe")
    data = token_file(tmp_path / "train.jsonl", n_docs=40, length=48)
    out = tmp_path / "search"
    assert main(["search", "--model", str(model_dir), "--calib", str(data), "--train", str(data), "--out", str(out),
                 "--params", "0.8", "--tolerance", "0.1", "--axes", "experts,expert-ffn", "--expert-ffn-divisor", "8",
                 "--retrain-steps", "1", "--top", "1", "--seq-len", "16", "--num-samples", "4", "--eval-blocks", "2",
                 "--batch-size", "2", "--no-progress"]) == 0
    report = last_json(capsys.readouterr().out)
    data = json.loads((out / "candidates.json").read_text())
    cands = data["candidates"]
    assert cands and all(c["num_experts"] < 6 or c["expert_intermediate_size"] < 40 for c in cands)
    assert all(c["shared_expert_intermediate_size"] == 56 and c["hidden_size"] == 48 for c in cands)
    best = next(c for c in cands if c["name"] == report["best"])
    loaded = AutoModelForCausalLM.from_pretrained(out / "best")
    sizes = model_sizes(loaded.config)
    assert (sizes["num_experts"], sizes["expert_intermediate_size"]) == (best["num_experts"],
                                                                         best["expert_intermediate_size"])
    assert sum(p.numel() for p in loaded.parameters()) == best["params"]
    # an axis the model lacks
    assert main(["search", "--model", str(model_dir), "--calib", str(data), "--train", str(data),
                 "--out", str(tmp_path / "s2"), "--seq-len", "16",
                 "--axes", "hidden,experts,layers,shared_ffn,expert_ffn,heads,ffn,x"]) == 2
    assert "allowed axes are hidden, ffn, heads, layers, experts, expert_ffn, shared_ffn" in capsys.readouterr().err
