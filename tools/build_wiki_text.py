"""Build ``minitron/assets/wiki_articles.txt``: English Wikipedia articles as plain prose.

Source: the 2016 English Wikipedia sample that the ``gensim`` package ships as a test file
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, an
export of the articles with ids 10-30302: Anarchism, Autism, Albedo, ...). Wikipedia text is licensed
under CC BY-SA 3.0 (see ``minitron/assets/wiki_articles_NOTICE.txt``). This script turns the wikitext
of each article (namespace 0, not a redirect) into paragraphs of prose: templates, tables, references,
files, categories, HTML and list/table lines removed, links replaced by their text, and the article cut
at its first closing section (See also, References, ...). One article per paragraph block: its title on
the first line, one paragraph per line, a blank line between articles (the layout of the other built-in
texts). Run once, offline after the wheel is fetched::

    pip download --no-deps --only-binary :all: gensim==4.4.0 -d /tmp/wheels
    python tools/build_wiki_text.py /tmp/wheels/gensim-4.4.0-*.whl minitron/assets/wiki_articles.txt
"""

from __future__ import annotations

import argparse
import bz2
import html
import re
import sys
import xml.etree.ElementTree as ET
import zipfile

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CLOSING = re.compile(r"^=+\s*(See also|References|Notes|External links|Further reading|Bibliography|Sources|"
                     r"Footnotes|Citations|Notes and references|Works cited)\s*=+\s*$", re.M | re.I)


def _strip_nested(text: str, pattern: re.Pattern[str]) -> str:
    """Remove innermost matches until none is left (templates and tables nest)."""
    while True:
        new = pattern.sub("", text)
        if new == text:
            return text
        text = new


TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
TABLE = re.compile(r"\{\|(?:(?!\{\|)[\s\S])*?\|\}")
FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]",
                       re.I)


def clean_wikitext(text: str) -> list[str]:
    """The prose paragraphs of one article's wikitext."""
    m = CLOSING.search(text)
    if m:
        text = text[:m.start()]
    text = re.sub(r"<!--[\s\S]*?-->", "", text)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>[\s\S]*?</ref>", "", text)
    text = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|code|score|imagemap)[^>]*>[\s\S]*?</\1>", "", text)
    text = _strip_nested(text, TEMPLATE)
    text = _strip_nested(text, TABLE)
    text = _strip_nested(text, FILE_LINK)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+\]", "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line[0] in "=*#:;|!{}[" or line.startswith("__"):
            continue  # headings, lists, table and template residue, magic words
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where a template was
        line = re.sub(r"[ \t]+", " ", line).replace(" ,", ",").replace(" .", ".").strip()
        if len(line) >= 80 and line[-1] in ".!?\"')" and "{{" not in line and "}}" not in line:
            paragraphs.append(line)
    return paragraphs


def articles(wheel: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) of each article in the wheel's Wikipedia sample, in file order."""
    with zipfile.ZipFile(wheel) as whl:
        xml = bz2.decompress(whl.read(MEMBER))
    out = []
    for _, el in ET.iterparse(__import__("io").BytesIO(xml)):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns = el.find("{*}ns")
        title = el.find("{*}title")
        text = el.find("{*}revision/{*}text")
        if ns is not None and ns.text == "0" and text is not None and text.text \
                and not text.text.lstrip().upper().startswith("#REDIRECT"):
            paragraphs = clean_wikitext(text.text)
            if paragraphs:
                out.append((title.text, paragraphs))
        el.clear()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", help="path to the gensim wheel")
    p.add_argument("out", help="text file to write (must not exist)")
    args = p.parse_args(argv)
    docs = articles(args.wheel)
    with open(args.out, "x", encoding="utf-8") as f:
        f.write("\n\n".join(title + "\n" + "\n".join(paras) for title, paras in docs) + "\n")
    print(f"{len(docs)} articles, {sum(len(t) + sum(map(len, ps)) for t, ps in docs)} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
