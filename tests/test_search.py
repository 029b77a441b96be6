"""minitron.search: candidate enumeration, exact parameter counts, the search loop, its report and bad input."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import minitron
from minitron.cli import build_parser, main
from minitron.arch_search import ParamCounter, SearchConfig, SearchResult, enumerate_candidates, search
from minitron.pruning.params import target_parameters

from tests.helpers import COMMON, make_model



pytestmark = pytest.mark.usefixtures("one_torch_thread")


DIVS = {"hidden": 6, "ffn": 8}  # hidden 48 -> {30, 36, 42, 48}, ffn 88 -> {56, 64, 72, 80, 88}


def _brute_force(model, budget: int, tol: float, width: float, depth: float) -> set[tuple[int, int, int, int]]:
    """Every target on the grid, checked with the library's own validator and meta-device counter."""
    c = model.config
    hidden = [h for h in range(6, 49, 6) if h >= 48 * (1 - width)]
    ffn = [f for f in range(8, 89, 8) if f >= 88 * (1 - width)]
    heads = [a for a in range(2, 7, 2) if a >= 6 * (1 - width)]
    layers = [l for l in range(1, 5) if l >= 4 * (1 - depth)]
    out = set()
    for h, f, a, l in itertools.product(hidden, ffn, heads, layers):
        t = minitron.Target(h, f, a, l)
        try:
            t.validate(c)
        except ValueError:
            continue
        if budget * (1 - tol) <= target_parameters(model, t) <= budget:
            out.add((h, f, a, l))
    return out


@pytest.mark.parametrize("params,tol,width,depth", [(0.6, 0.05, 0.4, 0.25), (0.75, 0.1, 0.4, 0.2), (0.5, 0.2, 0.5, 0.5)])
def test_enumeration_matches_brute_force(params, tol, width, depth):
    model = make_model("llama")
    cands, budget = enumerate_candidates(model, params, tol, divisors=DIVS, max_width_prune=width,
                                         max_depth_prune=depth)
    total = minitron.count_parameters(model)
    assert budget == int(params * total)
    got = {(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) for c in cands}
    assert got == _brute_force(model, budget, tol, width, depth) and got
    for c in cands:
        assert c.params == target_parameters(model, c.target)
        assert budget * (1 - tol) <= c.params <= budget
        assert c.num_attention_heads % COMMON["num_key_value_heads"] == 0
        assert c.hidden_size % c.num_attention_heads == 0  # Llama's config requires it
        assert c.hidden_size % 6 == 0 or c.hidden_size == 48
        assert c.intermediate_size % 8 == 0 or c.intermediate_size == 88
        assert c.hidden_size >= 48 * (1 - width) and c.num_hidden_layers >= 4 * (1 - depth)
    assert [c.params for c in cands] == sorted((c.params for c in cands), reverse=True)


def test_enumeration_axes_and_absolute_budget():
    model = make_model("llama")
    total = minitron.count_parameters(model)
    cands, budget = enumerate_candidates(model, 0.9 * total, 0.1, divisors=DIVS, axes=("ffn",))
    assert budget == int(0.9 * total)
    assert cands and all((c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (48, 6, 4) for c in cands)
    assert len({c.intermediate_size for c in cands}) == len(cands)


@pytest.mark.parametrize("family", ["llama", "qwen3", "starcoder2", "llama_mha_untied"])
def test_param_counter_exact(family):
    model = make_model(family)
    counter = ParamCounter(model)
    for t in [minitron.Target(), minitron.Target(36, 64, 4, 3), minitron.Target(24, 88, 2, 1),
              minitron.Target(num_hidden_layers=2)]:
        if family == "llama_mha_untied" and t.num_attention_heads:
            t = minitron.Target(t.hidden_size, t.intermediate_size, 6, t.num_hidden_layers)
        assert counter(t) == target_parameters(model, t)


def test_search_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, COMMON["vocab_size"], (8, 16), generator=g)
    train = torch.randint(0, COMMON["vocab_size"], (2000,), generator=g)
    valid = torch.randint(0, COMMON["vocab_size"], (6, 16), generator=g)
    res = search(model, calib, train, params=0.6, eval_data=valid, output_dir=tmp_path / "s", progress=False,
                 config=SearchConfig(tolerance=0.08, retrain_steps=2, top=3, divisors=DIVS, max_depth_prune=0.25,
                                     seq_len=16, batch_size=4))
    assert isinstance(res, SearchResult)
    n = len(res.candidates)
    assert n > 3
    assert sorted(c.rank_pruned for c in res.candidates) == list(range(1, n + 1))
    retrained = [c for c in res.candidates if c.loss_retrained is not None]
    assert sorted(c.rank_retrained for c in retrained) == [1, 2, 3]
    assert {c.rank_pruned for c in retrained} == {1, 2, 3}  # top-3 by loss after pruning were retrained
    assert res.best.rank_retrained == 1 and res.best.loss_retrained == min(c.loss_retrained for c in retrained)
    assert all(math.isfinite(c.loss_pruned) for c in res.candidates)
    # the best model is within the budget and is what the table says
    p = minitron.count_parameters(res.model)
    assert p == res.best.params and res.budget * 0.92 <= p <= res.budget
    assert res.model.config.hidden_size == res.best.hidden_size
    assert minitron.lm_loss(res.model, valid, 4) == pytest.approx(res.best.loss_retrained, rel=1e-4)
    # files: csv, json, markdown, plot, best checkpoint
    for key in ("csv", "json", "markdown", "plot"):
        assert (tmp_path / "s").joinpath(res.files[key].rsplit("/", 1)[-1]).stat().st_size > 0
    data = json.loads((tmp_path / "s" / "candidates.json").read_text())
    assert data["best"] == res.best.name and len(data["candidates"]) == n
    assert {"loss_pruned", "rank_pruned", "loss_retrained", "rank_retrained", "params"} <= set(data["candidates"][0])
    csv_lines = (tmp_path / "s" / "candidates.csv").read_text().strip().splitlines()
    assert len(csv_lines) == n + 1 and "rank_retrained" in csv_lines[0]
    md = res.markdown()
    assert "rank pruned" in md and "rank retrained" in md and res.best.name in md
    assert (tmp_path / "s" / "losses.png").read_bytes()[:4] == b"\x89PNG"
    loaded = AutoModelForCausalLM.from_pretrained(res.files["best"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(valid).logits, res.model(valid).logits)
    # the teacher is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_search_without_retraining(tmp_path):
    model = make_model("qwen2")
    ids = torch.randint(0, COMMON["vocab_size"], (400,), generator=torch.Generator().manual_seed(0))
    res = search(model, ids, ids, params=0.7, output_dir=tmp_path, progress=False,
                 config=SearchConfig(tolerance=0.1, retrain_steps=0, divisors=DIVS, seq_len=16))
    assert res.best.rank_pruned == 1 and all(c.loss_retrained is None for c in res.candidates)
    assert minitron.count_parameters(res.model) == res.best.params <= res.budget


def test_bad_input(tmp_path):
    model = make_model("llama")
    ids = torch.randint(0, COMMON["vocab_size"], (400,))
    with pytest.raises(ValueError, match=r"infeasible budget.*smallest reachable size is [\d,]+ parameters"):
        enumerate_candidates(model, 0.1)
    with pytest.raises(ValueError, match="infeasible budget"):
        search(model, ids, ids, params=0.1, output_dir=tmp_path, config=SearchConfig(seq_len=16))
    for tol in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="tolerance"):
            enumerate_candidates(model, 0.5, tol)
    with pytest.raises(ValueError, match="params"):
        enumerate_candidates(model, -1)
    with pytest.raises(ValueError, match="axes"):
        enumerate_candidates(model, 0.5, axes=("width",))
    with pytest.raises(ValueError, match="divisor"):
        enumerate_candidates(model, 0.5, divisors={"depth": 2})
    with pytest.raises(ValueError, match="top"):
        search(model, ids, ids, params=0.6, output_dir=tmp_path, config=SearchConfig(top=0, divisors=DIVS, seq_len=16))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture"):
        search(gpt2, ids, ids, params=0.5, output_dir=tmp_path)


def test_search_without_output_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_model("llama")
    ids = torch.randint(0, COMMON["vocab_size"], (400,), generator=torch.Generator().manual_seed(0))
    res = search(model, ids, ids, params=0.85, progress=False,
                 config=SearchConfig(tolerance=0.1, retrain_steps=1, top=1, divisors=DIVS, axes=("ffn",), seq_len=16))
    assert res.output_dir is None and res.files == {} and res.best.loss_retrained is not None
    assert list(tmp_path.iterdir()) == []


def test_search_cli_end_to_end_on_builtin_model(tmp_path, capsys):
    """`minitron search` on the built-in model over a tiny space (FFN only): table, files and best checkpoint."""
    out = tmp_path / "search"
    argv = ["search", "--model", "builtin-tiny", "--out", str(out), "--params", "0.9", "--tolerance", "0.06",
            "--axes", "ffn", "--ffn-divisor", "32", "--retrain-steps", "1", "--top", "2", "--seq-len", "32",
            "--num-samples", "4", "--eval-blocks", "2", "--batch-size", "2", "--no-progress"]
    args = build_parser().parse_args(argv)
    assert args.command == "search" and args.params == 0.9 and args.top == 2 and args.axes == "ffn"
    assert args.func.__module__ == "minitron.cli.search"
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    report = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    data = json.loads((out / "candidates.json").read_text())
    cands = data["candidates"]
    # the space: FFN only, multiples of 32 within 40% of 768, inside the 6% window under 90% of the parameters
    assert len(cands) >= 2
    total = data["original_params"]
    for c in cands:
        assert (c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]) == (256, 8, 8)
        assert c["intermediate_size"] % 32 == 0 and c["intermediate_size"] >= 768 * 0.6
        assert 0.9 * total * 0.94 <= c["params"] <= 0.9 * total
    assert sorted(c["rank_pruned"] for c in cands) == list(range(1, len(cands) + 1))
    retrained = [c for c in cands if c["loss_retrained"] is not None]
    assert sorted(c["rank_pruned"] for c in retrained) == [1, 2] and sorted(c["rank_retrained"] for c in retrained) == [1, 2]
    best = min(retrained, key=lambda c: c["loss_retrained"])
    assert data["best"] == report["best"] == best["name"] and report["params"] == best["params"]
    assert report["loss_retrained"] == round(best["loss_retrained"], 4)
    # the report files and the table printed on stdout
    assert set(report["files"]) == {"csv", "json", "markdown", "plot", "best"}
    assert len((out / "candidates.csv").read_text().strip().splitlines()) == len(cands) + 1
    table = (out / "candidates.md").read_text()
    assert all(c["name"] in table and c["name"] in stdout for c in cands) and "rank retrained" in stdout
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"
    # the best checkpoint: the best candidate's architecture, loadable with its tokenizer
    loaded = AutoModelForCausalLM.from_pretrained(out / "best")
    assert loaded.config.intermediate_size == best["intermediate_size"]
    assert minitron.count_parameters(loaded) == best["params"]
    assert (out / "best" / "tokenizer_config.json").is_file()
