"""A checkpoint folder never runs its own code, no request ever leaves, a folder without tokenizer still prunes."""

from __future__ import annotations

import builtins
import json
import socket
from pathlib import Path

import pytest
import torch

import minitron
from minitron.cli import main
from minitron.local import CustomCodeError
from minitron.models import load_tokenizer
from tests.helpers import make_model, save_checkpoint

FAST = ["--num-samples", "4", "--seq-len", "16", "--no-progress"]


def code_checkpoint(root: Path) -> tuple[Path, Path]:
    """A checkpoint whose config/tokenizer ``auto_map`` point at its own ``evil.py``; returns (dir, proof file)."""
    d = save_checkpoint(root / "ckpt")
    proof = root / "PWNED"
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evilllama", auto_map={"AutoConfig": "evil.EvilConfig",
                                                 "AutoModelForCausalLM": "evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok))
    (d / "evil.py").write_text(f"open({str(proof)!r}, 'w').write('ran')\n"
                               "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n"
                               "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return d, proof


def test_checkpoint_code_never_runs_even_when_a_prompt_would_be_answered_yes(tmp_path, monkeypatch, capsys):
    d, proof = code_checkpoint(tmp_path)
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "y")
    with pytest.raises(ValueError, match=r"custom code.*minitron never runs a checkpoint's own code") as err:
        minitron.load_model(d)
    assert "trust_remote_code" not in str(err.value)  # no flag minitron does not have
    try:  # the tokenizer either loads from its files or is refused: its code never runs
        load_tokenizer(d)
    except CustomCodeError:
        pass
    assert prompts == [] and not proof.exists()
    assert main(["prune", "--model", str(d), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "minitron never runs a checkpoint's own code" in capsys.readouterr().err
    assert prompts == [] and not proof.exists()


def test_tokenizer_fallback_for_a_hub_id_makes_no_request(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # as in a fresh process without the variable
    model = make_model("llama")
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id, not a local folder
    with pytest.raises(ValueError, match="text data needs a tokenizer"):
        minitron.prune(model, ["some text to calibrate on"] * 4, params=0.8, seq_len=16, progress=False,
                       verbose=False)
    assert calls == []


def test_prune_cli_on_a_folder_without_tokenizer_writes_the_model(tmp_path, capsys):
    d = tmp_path / "ckpt"
    make_model("llama").save_pretrained(d)  # config + weights, no tokenizer files
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 101, (8, 16), generator=torch.Generator().manual_seed(0)), ids)
    out = tmp_path / "out"
    assert main(["prune", "--model", str(d), "--calib", str(ids), "--layers", "3", "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr().out
    assert "no tokenizer" in captured
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    # text calibration needs the tokenizer the folder lacks: refused before calibration, in CLI terms
    assert main(["prune", "--model", str(d), "--layers", "3", "--out", str(tmp_path / "out2"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--data is text and --model" in err and "no tokenizer files" in err and "tokenizer=" not in err
    assert not (tmp_path / "out2").exists()


def test_every_from_pretrained_goes_through_the_local_only_loader():
    """Only ``minitron.local.from_pretrained`` may call transformers' ``from_pretrained``: it alone passes
    ``local_files_only=True`` and ``trust_remote_code=False`` in offline mode."""
    import ast
    from pathlib import Path

    import minitron

    root = Path(minitron.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "local.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"direct from_pretrained calls (use minitron.local.from_pretrained): {offenders}"


def test_one_tokenizer_loader_for_every_source(tmp_path):
    """models.load_tokenizer is the only loader: a checkpoint folder gives its tokenizer, a folder without one
    (named by the flag) and a missing folder are refused with the path (local.py has no second copy)."""
    import minitron.local

    assert not hasattr(minitron.local, "load_tokenizer")
    d = save_checkpoint(tmp_path / "ckpt")
    assert load_tokenizer(d)("hello world")["input_ids"]
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(ValueError, match=rf"--tokenizer {empty}: no usable tokenizer there"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match=r"not found locally: .*missing; .*nothing is downloaded"):
        load_tokenizer(tmp_path / "missing", flag="--teacher")
