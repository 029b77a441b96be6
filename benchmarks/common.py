"""Helpers shared by the benchmark scripts: memory probes, markdown tables, writing results.

Import it from a script in this folder (``from common import ...``; the scripts put their own
folder on ``sys.path``, as ``python benchmarks/x.py`` does). Nothing here imports torch at
import time, so subprocess workers stay cheap to start.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# ---- memory probes (Linux /proc; CUDA via torch) ---------------------------------------------


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...), -1 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_hwm() -> bool:
    """Reset the peak-RSS counter (``VmHWM``) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) counter
        return True
    except OSError:
        return False


def rss_mb() -> float:
    """Current resident set size in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process so far in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def base_mem(device: str) -> float:
    """The baseline of :func:`peak_mb`: CUDA bytes allocated (peak stats reset), or RSS MiB on CPU."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss_mb()


def peak_mb(device: str, base: float) -> float:
    """Extra peak MiB since :func:`base_mem`: ``max_memory_allocated`` on CUDA, ``ru_maxrss`` on CPU."""
    import torch

    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return max_rss_mb() - base


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- markdown and results ---------------------------------------------------------------------


def md_row(cells: Iterable[object]) -> str:
    """``| a | b | c |``"""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_head(columns: Sequence[str], align: str | None = None) -> str:
    """Header and separator lines; ``align`` one letter per column, ``l`` (``---``) or ``r`` (``---:``)."""
    align = align or "l" * len(columns)
    if len(align) != len(columns):
        raise ValueError(f"{len(columns)} columns but align={align!r}")
    return md_row(columns) + "\n|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"


def md_table(columns: Sequence[str], rows: Iterable[Iterable[object]], align: str | None = None) -> str:
    return "\n".join([md_head(columns, align), *(md_row(r) for r in rows)])


def write_result(path: str | os.PathLike, text: str) -> Path:
    """Write a results file (parent folders created); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---- subprocess workers -----------------------------------------------------------------------


def run_worker(script: str | os.PathLike, worker: str, spec: dict, *, code: str | os.PathLike = HERE.parent,
               cwd: str | os.PathLike | None = None, args: Sequence[str] = (), env: dict | None = None,
               timeout: float = 3600) -> dict:
    """Run ``script --worker WORKER --spec JSON [args]`` in a fresh process (clean peak RSS) and return its
    last ``RESULT {json}`` line; ``code`` goes first on ``PYTHONPATH`` (the checkout measured)."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(script), "--worker", worker, "--spec", json.dumps(spec), *args],
                       capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    for line in reversed(r.stdout.strip().splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {worker} failed: {r.stderr.strip()[-2000:]}")
