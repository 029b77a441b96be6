"""Bad input raises a ValueError that names the field and the fix; nothing is modified."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import minitron
from minitron.data import load_text_blocks
from tests.helpers import make_model


@pytest.fixture
def model():
    return make_model("llama")


@pytest.mark.parametrize(
    "target,match",
    [
        (minitron.Target(hidden_size=64), r"target larger than the model: hidden_size=64 > 48"),
        (minitron.Target(intermediate_size=100), r"intermediate_size=100 > 88"),
        (minitron.Target(num_hidden_layers=5), r"num_hidden_layers=5 > 4"),
        (minitron.Target(num_attention_heads=3), r"num_attention_heads=3 is not a multiple of num_key_value_heads=2.*allowed: 2, 4, 6"),
        (minitron.Target(hidden_size=0), r"hidden_size=0 must be a positive integer"),
        (minitron.Target(hidden_size=44), r"hidden_size=44 is not divisible by num_attention_heads=6.*nearest: 42, 48\)"),
        (minitron.Target(num_key_value_heads=1), r"num_attention_heads=6 is more than num_key_value_heads=1 groups of 3"),
        (minitron.Target(num_key_value_heads=3), r"num_key_value_heads=3 > 2"),
    ],
)
def test_infeasible_targets(model, calib_ids, target, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        minitron.prune(model, calib_ids, target, seq_len=16, progress=False, verbose=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hidden_size_suggestions_are_the_nearest_valid_values():
    # SmolLM2-135M shape: 9 heads, hidden 576; 384 lies between the multiples 378 and 387
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=64, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=1, vocab_size=32)
    with pytest.raises(ValueError, match=r"hidden_size=384 is not divisible by num_attention_heads=9.*nearest: 378, 387\)"):
        minitron.Target(hidden_size=384).validate(config)
    with pytest.raises(ValueError, match=r"nearest: 567, 576\)"):
        minitron.Target(hidden_size=570).validate(config)
    with pytest.raises(ValueError, match=r"nearest: 9\)"):
        minitron.Target(hidden_size=5).validate(config)


def test_required_divisor(model, calib_ids):
    with pytest.raises(ValueError, match="hidden_size=42 is not divisible by the required divisor 8"):
        minitron.prune(model, calib_ids, minitron.Target(hidden_size=42), divisors={"hidden_size": 8}, verbose=False)
    for divisors, match in (({"hidden_size": 0}, "divisor hidden_size=0 must be a positive integer"),
                            ({"hidden": 8}, "unknown divisor key 'hidden'; allowed: hidden_size, intermediate_size")):
        for kw in (dict(target=minitron.Target(hidden_size=42)), dict(params=0.5)):
            with pytest.raises(ValueError, match=match):
                minitron.prune(model, calib_ids, divisors=divisors, seq_len=16, progress=False, verbose=False, **kw)


def test_unsupported_architecture_lists_supported(calib_ids):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=101))
    with pytest.raises(ValueError, match=r"unsupported architecture: model_type='gpt2'.*llama, mistral, qwen2, qwen3, starcoder2, gemma2, gemma3_text, phi3"):
        minitron.prune(gpt2, calib_ids, minitron.Target(intermediate_size=16))


def test_unknown_aggregation():
    with pytest.raises(ValueError, match=r"unknown batch_agg='median'; allowed values: mean, l2, var"):
        minitron.ImportanceConfig(batch_agg="median")
    with pytest.raises(ValueError, match=r"unknown seq_agg='max'"):
        minitron.ImportanceConfig(seq_agg="max")


def test_empty_calibration_data(model):
    with pytest.raises(ValueError, match="empty calibration"):
        minitron.prune(model, torch.zeros(0, 16, dtype=torch.long), minitron.Target(hidden_size=36), seq_len=16, verbose=False)
    with pytest.raises(ValueError, match="empty calibration"):
        minitron.prune(model, None, minitron.Target(hidden_size=36), verbose=False)
    with pytest.raises(ValueError, match="empty calibration"):
        load_text_blocks(torch.arange(10), None, seq_len=16)


def test_missing_target_and_unknown_depth_metric(model, calib_ids):
    with pytest.raises(ValueError, match="nothing to prune"):
        minitron.prune(model, calib_ids)
    with pytest.raises(ValueError, match="unknown depth_mode='middle'"):
        minitron.prune(model, calib_ids, minitron.Target(num_hidden_layers=2), seq_len=16, depth_mode="middle",
                       progress=False, verbose=False)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="not found: /nonexistent/calib.txt"):
        load_text_blocks("/nonexistent/calib.txt", None, 16)
    with pytest.raises(FileNotFoundError, match="importance file not found"):
        minitron.ImportanceScores.load("/nonexistent/scores.safetensors")


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": [1 + (ord(c) % 100) for c in text]}


def test_data_kinds_pack_identically(tmp_path):
    docs = ["first document " * 5, "second one " * 7, "third " * 9]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    from datasets import Dataset

    tok = CharTokenizer()
    expected = load_text_blocks(docs, tok, 16)
    assert expected.shape == (sum(len(d) + 1 for d in docs) // 16, 16)
    for data in (tmp_path / "c.txt", str(tmp_path / "c.jsonl"), Dataset.from_dict({"text": docs})):
        assert torch.equal(load_text_blocks(data, tok, 16), expected)
    assert load_text_blocks(docs, tok, 16, max_blocks=2).shape == (2, 16)


# ---- unreadable data: one-line errors naming the file (and line) ---------------------------------------


def test_binary_and_non_utf8_files_are_named(tmp_path):
    tok = CharTokenizer()
    (tmp_path / "w.txt").write_bytes(b"caf\xe9 latin-1 text")
    with pytest.raises(ValueError, match=r"w.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        load_text_blocks(tmp_path / "w.txt", tok, 4)
    (tmp_path / "b.txt").write_bytes(b"abc\x00\x01\x02" * 20)
    with pytest.raises(ValueError, match="b.txt looks binary"):
        load_text_blocks(tmp_path / "b.txt", tok, 4)
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not UTF-8"):
        load_text_blocks(tmp_path / "c.jsonl", tok, 4)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON"):
        load_text_blocks(path, CharTokenizer(), 4)
    path.write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl:2: jsonl record has no 'text' field"):
        load_text_blocks(path, CharTokenizer(), 4)


def test_jsonl_strings_upper_case_suffix_and_token_lists(tmp_path):
    tok = CharTokenizer()
    docs = ["first document " * 3, "second " * 5]
    expected = load_text_blocks(docs, tok, 8)
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(d) for d in docs), encoding="utf-8")  # JSON strings
    assert torch.equal(load_text_blocks(tmp_path / "s.jsonl", tok, 8), expected)
    (tmp_path / "U.JSONL").write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    assert torch.equal(load_text_blocks(tmp_path / "U.JSONL", tok, 8), expected)

    lists = [[1, 2, 3, 4, 5], [6, 7, 8]]  # pre-tokenised, as a Hugging Face input_ids column
    assert load_text_blocks(lists, None, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    (tmp_path / "ids.jsonl").write_text('[1, 2, 3, 4, 5]\n{"input_ids": [6, 7, 8]}\n', encoding="utf-8")
    assert load_text_blocks(tmp_path / "ids.jsonl", None, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="mixes text and token-id lists"):
        load_text_blocks(["text", [1, 2]], tok, 2)


def test_json_files_are_read_as_json_not_text(tmp_path):
    tok = CharTokenizer()
    docs = ["first document " * 3, "second " * 5]
    ids = [[1, 2, 3, 4, 5], [6, 7, 8]]
    cases = {"ids.json": (ids, None, [[1, 2, 3, 4], [5, 6, 7, 8]]),  # token-id lists: no tokenizer needed
             "flat.json": ([1, 2, 3, 4, 5, 6, 7, 8, 9], None, [[1, 2, 3, 4], [5, 6, 7, 8]]),
             "texts.json": (docs, tok, load_text_blocks(docs, tok, 4).tolist()),
             "records.json": ([{"text": d} for d in docs], tok, load_text_blocks(docs, tok, 4).tolist())}
    for name, (content, tokenizer, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
        assert load_text_blocks(tmp_path / name, tokenizer, 4).tolist() == expected, name
    (tmp_path / "obj.json").write_text('{"text": "one"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"obj.json holds a JSON dict, not a list"):
        load_text_blocks(tmp_path / "obj.json", tok, 4)
    (tmp_path / "bad.json").write_text('[{"body": "x"}]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.json\[0\]: item has no 'text' field"):
        load_text_blocks(tmp_path / "bad.json", tok, 4)
    (tmp_path / "broken.json").write_text('[1, 2,\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken.json:2: not valid JSON"):
        load_text_blocks(tmp_path / "broken.json", tok, 4)


def test_directory_as_data(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory; pass a .txt or .jsonl file"):
        load_text_blocks(tmp_path, CharTokenizer(), 4)


# ---- prune API: counts, non-finite values, token ids --------------------------------------------------


def test_prune_rejects_bad_counts_and_positions(model, calib_ids):
    target = minitron.Target(hidden_size=36)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1, got -3"):
        minitron.prune(model, calib_ids, target, seq_len=16, num_samples=-3, verbose=False)
    with pytest.raises(ValueError, match="seq_len=128 exceeds the model's max_position_embeddings=64"):
        minitron.prune(model, calib_ids, target, seq_len=128, verbose=False)
    with pytest.raises(ValueError, match="blocks/samples must be a positive integer"):
        load_text_blocks(calib_ids, None, 16, max_blocks=0)


def test_prune_accepts_token_id_lists(model):
    lists = torch.randint(0, 101, (6, 20), generator=torch.Generator().manual_seed(0)).tolist()
    small = minitron.prune(model, lists, minitron.Target(intermediate_size=40), seq_len=16, progress=False,
                           verbose=False)
    assert small.config.intermediate_size == 40


def test_non_finite_weights_and_scores_stop_pruning(model, calib_ids):
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weight model.layers.1.mlp.up_proj.weight holds NaN/inf"):
        minitron.prune(model, calib_ids, minitron.Target(hidden_size=36), seq_len=16, verbose=False)

    healthy = make_model("llama")
    scores = minitron.collect_importance(healthy, calib_ids, progress=False)
    scores.sums["mlp.0"][1][3] = float("inf")  # an fp16 overflow in calibration
    with pytest.raises(ValueError, match=r"importance statistics hold NaN/inf at mlp.0.sum_x2"):
        minitron.prune(healthy, target=minitron.Target(intermediate_size=40), scores=scores, verbose=False)


def test_token_ids_outside_the_vocabulary(model):
    bad = torch.full((2, 16), 500)
    with pytest.raises(ValueError, match=r"holds token id 500 but the model's vocabulary has 101 entries"):
        minitron.prune(model, bad, minitron.Target(hidden_size=36), seq_len=16, verbose=False)
    with pytest.raises(ValueError, match="token id -1"):
        minitron.perplexity(model, torch.full((1, 8), -1))


def test_garbage_scores_file(tmp_path):
    path = tmp_path / "scores.safetensors"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=f"{path} is not a readable minitron importance file"):
        minitron.ImportanceScores.load(path)


def test_phi3_longrope_needs_hidden_equal_heads_times_head_dim():
    """Phi3Config validates longrope factors against hidden_size // num_attention_heads (not head_dim)."""
    from transformers import Phi3Config

    from tests.helpers import COMMON

    config = Phi3Config(**COMMON, head_dim=8, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, original_max_position_embeddings=32,
                        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1], "long_factor": [1.0, 1.5]})
    for target in (minitron.Target(num_attention_heads=4), minitron.Target(hidden_size=36)):
        with pytest.raises(ValueError, match=r"hidden_size = num_attention_heads \* head_dim \(8\)"):
            target.validate(config)
    minitron.Target(hidden_size=32, num_attention_heads=4).validate(config)  # 32 = 4 * 8: accepted
    minitron.Target(intermediate_size=40).validate(config)


def test_params_budget_says_how_it_is_read(model, calib_ids, monkeypatch):
    import minitron.pruner

    def no_calibration(*a, **k):
        raise AssertionError("calibrated before the budget was checked")

    monkeypatch.setattr(minitron.pruner, "collect_importance", no_calibration)
    total = minitron.count_parameters(model)
    for params, match in ((1.5, r"params=1.5 is read as an absolute parameter count \(values > 1 are counts.*under "
                                r"1% of the model's .*pass a value in \(0, 1\]"),
                          (50, r"params=50 is read as an absolute parameter count.*under 1% of the model's"),
                          (total * 2, r"counts, not fractions\), more than the model.s"),
                          (float("nan"), r"params=nan must be a fraction in \(0, 1\]"), (0, "params=0 must be")):
        with pytest.raises(ValueError, match=match):
            minitron.prune(model, calib_ids, params=params, seq_len=16, verbose=False)
    from minitron.pruning.params import budget_count

    assert budget_count(0.5, 1000) == 500 and budget_count(300, 1000) == 300 and budget_count(1, 1000) == 1000


def test_batch_agg_is_checked_for_depth_only_targets(model, calib_ids):
    with pytest.raises(ValueError, match=r"unknown batch_agg='max'; allowed values: mean, l2, var"):
        minitron.prune(model, calib_ids, minitron.Target(num_hidden_layers=2), batch_agg="max", depth_metric="bi",
                       seq_len=16, progress=False, verbose=False)


def test_non_causal_checkpoint_gets_the_family_list(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=16, num_layers=1,
                                        num_heads=2)).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError) as err:
        minitron.load_model(tmp_path / "t5")
    message = str(err.value)
    assert "model_type='t5' (not a causal language model); minitron supports causal LMs of model_type llama" in message
    assert len(message) < 400 and "\n" not in message
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"model_type='no-such-model' \(unknown to transformers\); minitron supports"):
        minitron.load_model(tmp_path / "t5")


class ForwardCounter:
    """Counts forward calls of every decoder layer (a forward pass anywhere in the model runs layer 0)."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.layers[0].register_forward_pre_hook(self._count)

    def _count(self, *args):
        self.calls += 1


def test_every_option_is_refused_before_the_first_forward(model, calib_ids):
    seen = ForwardCounter(model)
    heads = minitron.Target(num_attention_heads=4)  # prunes neither layers nor (here) hidden
    cases = [
        (dict(params=1.0), r"params=1.0 gives a budget of \d+ >= the model's"),
        (dict(params=2.0), r"params=2 is read as an absolute parameter count"),
        (dict(target=heads, config=minitron.PruneConfig(), depth_metric="foo"), r"unknown depth_metric='foo'; allowed"),
        (dict(target=heads, head_metric="bar"), r"unknown head_metric='bar'"),
        (dict(target=heads, method="magic"), r"unknown method='magic'"),
        (dict(target=heads, depth_rounds=0), r"depth_rounds must be an integer >= 1"),
        (dict(target=heads, budget_blocks=2.5), r"budget_blocks must be an integer >= 1"),
        (dict(target=heads, divisors={"hidden": 8}), r"unknown divisor key 'hidden'"),
        (dict(target=heads, norm_rescale="yes"), r"norm_rescale must be True or False"),
        (dict(target=heads, bogus=1), r"unknown keyword argument\(s\) bogus"),
    ]
    for kwargs, match in cases:
        with pytest.warns(DeprecationWarning) if set(kwargs) - {"params", "target", "config"} else _no_warning():
            with pytest.raises(ValueError, match=match):
                minitron.prune(model, calib_ids, **kwargs, progress=False, verbose=False)
    assert seen.calls == 0
    for bad in (True, 2.5, 0):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            minitron.ImportanceConfig(batch_size=bad)
    with pytest.raises(ValueError, match="ppl_max_blocks must be an integer >= 1"):
        minitron.ImportanceConfig(ppl_max_blocks=1.5)
    with pytest.raises(ValueError, match="unknown depth_metric='foo'"):
        minitron.PruneConfig(depth_metric="foo")


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            yield

    return ctx()


def test_legacy_keywords_still_work_with_a_deprecation_warning(model, calib_ids):
    import copy

    target = minitron.Target(hidden_size=36, num_hidden_layers=3)
    with pytest.warns(DeprecationWarning, match=r"minitron.prune\(batch_agg, depth_metric, seq_len=...\)"):
        old = minitron.prune(copy.deepcopy(model), calib_ids, target, seq_len=16, depth_metric="bi",
                             batch_agg="mean", progress=False, verbose=False)
    config = minitron.PruneConfig(seq_len=16, depth_metric="bi", importance=minitron.ImportanceConfig(batch_agg="mean"))
    new = minitron.prune(copy.deepcopy(model), calib_ids, target, config=config, progress=False, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))
    # a keyword overrides the config's field
    with pytest.warns(DeprecationWarning):
        over = minitron.prune(copy.deepcopy(model), calib_ids, target, config=minitron.PruneConfig(seq_len=16),
                              depth_metric="bi", batch_agg="mean", progress=False, verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(over.state_dict().values(), new.state_dict().values()))
