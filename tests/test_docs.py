"""The method reference the code cites lives in the repo: every "docs/method.md section N" names a section
that exists, nothing points outside the repo (no METHOD.md elsewhere, no ../shared), and the README names
the modules that hold the params= rule."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("minitron", "kernels", "benchmarks", "tools", "docs", "csrc") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".md")] + [ROOT / "README.md"]
CITATION = re.compile(r"docs/method\.md,? sections? (\d+)(?:\s*[-/]\s*(\d+))?")


def _sections() -> set[int]:
    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)}


def test_every_method_citation_names_a_section_of_docs_method_md():
    sections = _sections()
    assert {1, 2, 3, 4, 5} <= sections
    cited, missing = 0, []
    for path in SOURCES:
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            cited += 1
            missing += [f"{path.relative_to(ROOT)}: section {n}" for n in range(lo, hi + 1) if n not in sections]
    assert missing == [] and cited >= 14  # the docstrings that cite the method


def test_nothing_points_outside_the_repo():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES
                 if re.search(r"(?<!docs/)\bMETHOD\.md|\.\./shared", p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_readme_names_the_modules_of_the_params_rule():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for module in re.findall(r"minitron/[\w/]+\.py", readme):
        assert (ROOT / module).is_file(), f"README names {module}, which does not exist"
    assert "minitron/pruning/budget.py" in readme and "minitron/sizing.py" not in readme
