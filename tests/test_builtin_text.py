"""The shipped English texts: splits, data names, and what the built-in distillation job trains and scores on."""

from __future__ import annotations

import pytest
import torch

from minitron.data import BUILTIN_CORPORA, builtin_documents, builtin_text, load_text_blocks
from minitron.models import BUILTIN_DATA, input_paths, load_model, text_source


@pytest.mark.parametrize("corpus", sorted(BUILTIN_CORPORA))
def test_splits_cover_the_text_once(corpus):
    train, valid = builtin_text("train", corpus), builtin_text("valid", corpus)
    assert train + valid == BUILTIN_CORPORA[corpus].read_text(encoding="utf-8")
    assert 0.05 < len(valid) / (len(train) + len(valid)) < 0.15


def test_commons_split_keeps_speeches_whole():
    train, valid = builtin_text("train", "commons"), builtin_text("valid", "commons")
    assert train.endswith("\n\n") and not valid.startswith("\n")
    speeches = BUILTIN_CORPORA["commons"].read_text(encoding="utf-8").split("\n\n")
    assert len(speeches) > 900
    assert set(builtin_documents("train", ["commons"])) | set(builtin_documents("valid", ["commons"])) == \
        {s for s in speeches if s.strip()}
    assert "â€" not in train + valid and "Â£" not in train + valid  # no mojibake left in the shipped text


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown corpus='wiki'; allowed values: pydoc, commons"):
        builtin_text("train", "wiki")
    with pytest.raises(ValueError, match="unknown split='test'"):
        builtin_text("test", "commons")


def test_data_names_resolve_to_the_shipped_files():
    mix = text_source("builtin-mix")
    assert mix[0] == builtin_text("train", "pydoc") and mix[1:] == builtin_documents("train", ["commons"])
    assert text_source("builtin", "valid") == [builtin_text("valid")]
    assert text_source("builtin-commons", "valid") == builtin_documents("valid", ["commons"])
    assert text_source("my.txt") == "my.txt"
    assert input_paths(None, None, "builtin-mix") == [BUILTIN_CORPORA["pydoc"], BUILTIN_CORPORA["commons"]]
    assert set(BUILTIN_DATA) == {"builtin", "builtin-commons", "builtin-mix"}


def test_distill_builtin_job_trains_and_scores_on_both_texts(tmp_path, monkeypatch, capsys):
    """The built-in job: train on the manual and the speeches, score on 8 held-out blocks of each."""
    import minitron.distillation.trainer as trainer
    from minitron.cli import main

    seen = {}

    def fake_distill(student, teacher, data, eval_data, **kw):
        seen.update(data=data, eval_data=eval_data)
        return student

    monkeypatch.setattr(trainer, "distill", fake_distill)
    import minitron.distillation.metrics as metrics

    monkeypatch.setattr(metrics, "read_rows", lambda path: [])
    assert main(["distill", "--teacher", "builtin-tiny", "--num-samples", "4", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "64", "--no-progress", "--no-plot", "--output-dir", str(tmp_path / "run")]) == 0
    assert seen["data"] == text_source("builtin-mix")
    _, tok = load_model("builtin-tiny")
    expected = torch.cat([load_text_blocks(text_source(n, "valid"), tok, 64)[:8] for n in ("builtin", "builtin-commons")])
    assert torch.equal(seen["eval_data"], expected)
    assert "held-out perplexity" in capsys.readouterr().out
