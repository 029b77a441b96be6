"""Print the package versions this environment tests, and how they differ from the known-good set.

``constraints.txt`` at the repo root pins every distribution of the last environment in which the whole
test suite passed (CI installs the newest releases, as users do). ``.ci/run`` calls this after the install
so every CI log names what it tested; after a green run on newer releases, refresh the file with
``--write`` and commit it.

Run::

    python tools/tested_versions.py            # versions + differences from constraints.txt
    python tools/tested_versions.py --write    # make constraints.txt the current environment
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
SKIP = {"minitron", "pip"}  # the project itself; pip is whatever the venv came with
KEY = ("torch", "transformers", "kernels", "triton", "liger-kernel", "accelerate", "safetensors", "tokenizers",
       "huggingface-hub", "datasets", "gguf", "numpy", "setuptools")
HEADER = """\
# Known-good set: the versions of every package in the environment where the whole minitron test suite
# last passed (README command 1 on a fresh machine, Python {python}, CPU torch). Use it when the newest
# releases break something: pip install -c constraints.txt ...   Refresh: python tools/tested_versions.py --write
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """name -> version of every installed distribution, local version labels (``+cpu``) dropped."""
    out = {}
    for dist in md.distributions():
        name = canonical(dist.metadata["Name"] or "")
        if name and name not in SKIP:
            out[name] = dist.version.split("+")[0]
    return dict(sorted(out.items()))


def known_good(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[canonical(name)] = version.strip()
    return pins


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="write constraints.txt from this environment")
    args = p.parse_args(argv)
    now = installed()
    if args.write:
        python = ".".join(map(str, sys.version_info[:2]))
        body = "".join(f"{name}=={version}\n" for name, version in now.items())
        tmp = CONSTRAINTS.with_suffix(".txt.tmp")
        tmp.write_text(HEADER.format(python=python) + body, encoding="utf-8")
        tmp.replace(CONSTRAINTS)
        print(f"{CONSTRAINTS.name}: {len(now)} packages written")
        return 0
    print(f"tested with Python {sys.version.split()[0]}: " +
          ", ".join(f"{k} {now[k]}" for k in KEY if k in now))
    pins = known_good()
    changed = [f"{k} {pins[k]} -> {v}" for k, v in now.items() if k in pins and pins[k] != v]
    new = [f"{k} {v}" for k, v in now.items() if k not in pins]
    gone = [k for k in pins if k not in now]
    if not pins:
        print(f"no {CONSTRAINTS.name}: nothing to compare with")
    elif not (changed or new or gone):
        print(f"identical to the known-good set in {CONSTRAINTS.name} ({len(pins)} packages)")
    else:
        print(f"differs from the known-good set in {CONSTRAINTS.name}:")
        for label, items in (("changed", changed), ("not in the set", new), ("missing", gone)):
            if items:
                print(f"  {label}: " + ", ".join(items))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
