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


@pytest.mark.parametrize("corpus, count", [("commons", 1000), ("wiki", 100)])
def test_split_keeps_speeches_and_articles_whole(corpus, count):
    train, valid = builtin_text("train", corpus), builtin_text("valid", corpus)
    assert train.endswith("\n\n") and not valid.startswith("\n")
    docs = BUILTIN_CORPORA[corpus].read_text(encoding="utf-8").split("\n\n")
    assert len(docs) == count
    assert set(builtin_documents("train", [corpus])) | set(builtin_documents("valid", [corpus])) == \
        {d for d in docs if d.strip()}
    assert "â€" not in train + valid and "Â£" not in train + valid  # no mojibake left in the shipped text
    assert not any(m in train + valid for m in ("{{", "}}", "[[", "]]", "<ref", "&nbsp;"))  # no wiki markup left


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="unknown corpus='news'; allowed values: pydoc, commons, wiki"):
        builtin_text("train", "news")
    with pytest.raises(ValueError, match="unknown split='test'"):
        builtin_text("test", "commons")


def test_data_names_resolve_to_the_shipped_files():
    assert text_source("builtin", "valid") == [builtin_text("valid")]
    assert text_source("builtin-commons", "valid") == builtin_documents("valid", ["commons"])
    assert text_source("builtin-wiki") == builtin_documents("train", ["wiki"])
    assert text_source("my.txt") == "my.txt"
    assert input_paths(None, None, "builtin-mix") == [BUILTIN_CORPORA[c] for c in ("pydoc", "commons", "wiki")]
    assert set(BUILTIN_DATA) == {"builtin", "builtin-commons", "builtin-wiki", "builtin-mix"}


@pytest.mark.parametrize("split", ["train", "valid"])
def test_mix_interleaves_the_texts_in_proportion(split):
    """``builtin-mix`` holds every document of each text once, in the text's own order (the manual as its
    topic pages), and every prefix holds each text in its share: the first calibration blocks are not all
    manual. Invariant: how far through its text each text is differs by at most one document."""
    mix = text_source("builtin-mix", split)
    other = {"commons": builtin_documents(split, ["commons"]), "wiki": builtin_documents(split, ["wiki"])}
    in_other = set(other["commons"]) | set(other["wiki"])
    per_text = {"pydoc": [d for d in mix if d not in in_other], **other}
    assert "\n\n".join(per_text["pydoc"]).strip("\n") == builtin_text(split, "pydoc").strip("\n")
    assert len(per_text["pydoc"]) > 5 and all(d.split("\n")[1].startswith("***") for d in per_text["pydoc"][1:])
    assert len(mix) == sum(map(len, per_text.values()))
    for name in other:
        assert [d for d in mix if d in set(other[name])] == other[name]
    total = {k: sum(map(len, v)) for k, v in per_text.items()}
    slack = max(max(map(len, v)) / total[k] for k, v in per_text.items())
    owner = {d: k for k, v in per_text.items() for d in v}
    through = dict.fromkeys(per_text, 0.0)
    for doc in mix:
        through[owner[doc]] += len(doc) / total[owner[doc]]
        assert max(through.values()) - min(through.values()) <= slack + 1e-9


def test_distill_builtin_job_prunes_trains_and_scores_on_all_texts(tmp_path, monkeypatch, capsys):
    """The built-in job: calibrate the pruning on builtin-mix and train on it, score on 8 held-out blocks of each
    built-in text."""
    import minitron
    import minitron.distillation.trainer as trainer
    from minitron.cli import main

    seen = {}
    prune = minitron.prune

    def spy_prune(model, data, **kw):
        seen["calibration"] = data
        return prune(model, data, **kw)

    def fake_distill(student, teacher, data, eval_data, **kw):
        seen.update(data=data, eval_data=eval_data)
        return student

    monkeypatch.setattr(minitron, "prune", spy_prune)
    monkeypatch.setattr(trainer, "distill", fake_distill)
    import minitron.distillation.metrics as metrics

    monkeypatch.setattr(metrics, "read_rows", lambda path: [])
    assert main(["distill", "--teacher", "builtin-tiny", "--num-samples", "4", "--steps", "1", "--batch-size", "2",
                 "--seq-len", "64", "--no-progress", "--no-plot", "--output-dir", str(tmp_path / "run")]) == 0
    assert seen["data"] == text_source("builtin-mix") and seen["calibration"] == text_source("builtin-mix")
    _, tok = load_model("builtin-tiny")
    expected = torch.cat([load_text_blocks(text_source(n, "valid"), tok, 64)[:8]
                          for n in ("builtin", "builtin-commons", "builtin-wiki")])
    assert torch.equal(seen["eval_data"], expected)
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "calibration: 4 blocks of builtin-mix" in out
