"""The texts and the model minitron ships: where they lie, their train/held-out splits, and the built-in
data names' documents (see README, "The built-in model and text", for sources and licences)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_TEXT = ASSETS_DIR / "pydoc_topics.txt"
COMMONS_TEXT = ASSETS_DIR / "commons_speeches.txt"
WIKI_TEXT = ASSETS_DIR / "wiki_articles.txt"
BUILTIN_CORPORA = {"pydoc": BUILTIN_TEXT, "commons": COMMONS_TEXT, "wiki": WIKI_TEXT}
"""The shipped English texts: Python reference-manual topic pages (technical prose, what the built-in
model was trained on), 1,000 House of Commons speeches 1989-2019 (general spoken English: questions
and answers on every policy area) and 100 English Wikipedia articles (encyclopedic prose: history,
science, places, people, art). README, "The built-in model and text", gives sources and licences."""
_PER_DOCUMENT = ("commons", "wiki")  # texts made of documents separated by blank lines (a speech, an article)
BUILTIN_MODEL = ASSETS_DIR / "tiny-llama-pydoc"
BUILTIN_VALID_FRACTION = 0.1  # the tail of each text, never trained on (the built-in model never saw it either)


def builtin_text(split: str = "train", corpus: str = "pydoc") -> str:
    """One built-in English text: the Python reference manual's topic pages, House of Commons speeches or
    Wikipedia articles.

    Args:
        split: ``"train"`` (first 90%; for ``pydoc`` what the built-in model was trained and is
            calibrated on) or ``"valid"`` (last 10%, held out, used for perplexity). The speeches
            are in date order, so their held-out split is the latest speeches (2017-2019); the articles'
            is the last articles of the file (no article is split).
        corpus: ``"pydoc"`` (default), ``"commons"`` or ``"wiki"``.
    Returns:
        The text of that split; documents are separated by blank lines.
    Example:
        >>> builtin_text("valid", corpus="commons")[:30]
    """
    if corpus not in BUILTIN_CORPORA:
        raise ValueError(f"unknown corpus={corpus!r}; allowed values: {', '.join(BUILTIN_CORPORA)}")
    text = BUILTIN_CORPORA[corpus].read_text(encoding="utf-8")
    cut = int(len(text) * (1 - BUILTIN_VALID_FRACTION))
    if corpus in _PER_DOCUMENT:  # cut at a document boundary: no speech or article is split between the splits
        cut = text.rfind("\n\n", 0, cut) + 2
    if split == "train":
        return text[:cut]
    if split == "valid":
        return text[cut:]
    raise ValueError(f"unknown split={split!r}; allowed values: train, valid")


_PAGE = re.compile(r"\n\n(?=[^\n]+\n\*+\n)")  # before a manual topic page: its title, then a line of ``*``


def _corpus_documents(split: str, corpus: str, pages: bool) -> list[str]:
    text = builtin_text(split, corpus)
    if corpus in _PER_DOCUMENT:
        return [d for d in text.split("\n\n") if d.strip()]
    return [d for d in _PAGE.split(text) if d.strip()] if pages else [text]


def builtin_documents(split: str = "train", corpora: Iterable[str] = tuple(BUILTIN_CORPORA)) -> list[str]:
    """Documents of one or several built-in texts, for :func:`load_text_blocks`: each speech and each
    article its own document (so EOS separates them, as in real multi-document training data); the manual
    one document when alone, one per topic page in a mix.

    Several texts are interleaved in proportion to their length (each next document comes from the text
    that is least far through, by characters), so every prefix of the token stream, such as the first
    ``num_samples`` calibration blocks of ``minitron.prune``, holds each text in its share, not only the
    first text.

    Args:
        split: ``"train"`` or ``"valid"`` (see :func:`builtin_text`).
        corpora: names from :data:`BUILTIN_CORPORA` (default: all; the built-in distillation job uses all).
    Returns:
        A list of strings.
    Example:
        >>> docs = builtin_documents("valid")
        >>> len(docs) > 1
        True
    """
    corpora = list(corpora)
    per_text = [_corpus_documents(split, c, pages=len(corpora) > 1) for c in corpora]
    if len(per_text) == 1:
        return per_text[0]
    totals = [max(1, sum(map(len, docs))) for docs in per_text]
    taken = [0] * len(per_text)  # documents taken from each text
    chars = [0] * len(per_text)  # their characters
    out: list[str] = []
    while True:
        live = [i for i, docs in enumerate(per_text) if taken[i] < len(docs)]
        if not live:
            return out
        i = min(live, key=lambda k: (chars[k] / totals[k], k))
        doc = per_text[i][taken[i]]
        taken[i] += 1
        chars[i] += len(doc)
        out.append(doc)
