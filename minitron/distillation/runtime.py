"""The machine a distillation run runs on: physical cores, load, fast-bf16 CPUs, the thread count.

Everything here is read once per run and logged, so a tokens/s figure in ``metrics.jsonl`` can be
judged: how many threads ran, whether the machine was shared, and why bf16 was or was not used.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 dot products


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on (``os.sched_getaffinity``; all CPUs where it is missing)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _cgroup_cpu_limit() -> float | None:
    """CPUs granted by a cgroup v2 ``cpu.max`` quota (containers), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


@lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may use: hyper-thread siblings count once.

    The usable logical CPUs (affinity mask) are grouped by ``(physical_package_id, core_id)`` from
    ``/sys/devices/system/cpu/cpuN/topology`` (as ``lscpu`` does); where that is unreadable each
    logical CPU counts as a core. A cgroup CPU quota below that count lowers it (rounded up).

    Returns:
        The number of physical cores, at least 1.
    Example:
        >>> physical_cores() >= 1
        True
    """
    cpus = usable_cpus()
    cores: set[tuple[str, str] | int] = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(c)
    n = max(1, len(cores))
    quota = _cgroup_cpu_limit()
    return max(1, min(n, math.ceil(quota))) if quota else n


def default_threads() -> int:
    """Threads of a run without ``DistillConfig.threads``: the physical cores, shared by the ranks on this machine.

    Under ``torchrun`` (``LOCAL_WORLD_SIZE`` ranks per machine) each rank gets ``cores // LOCAL_WORLD_SIZE``
    (at least 1), so the ranks together use the physical cores once.

    Returns:
        The thread count, at least 1.
    Example:
        >>> default_threads() >= 1
        True
    """
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, physical_cores() // local)


@lru_cache(maxsize=1)
def fast_bf16_cpu() -> str | None:
    """How this CPU was found to have native bf16 matrix instructions, or None.

    Read once from the ``flags`` line of ``/proc/cpuinfo`` (Linux): AMX-BF16 or AVX512-BF16, on which
    oneDNN runs bf16 GEMMs about 2x faster than fp32. Without them bf16 is emulated and slower.

    Returns:
        e.g. ``"/proc/cpuinfo flags amx_bf16, avx512_bf16"``, or None (no such flag, or no /proc/cpuinfo).
    Example:
        >>> fast_bf16_cpu() in (None,) or fast_bf16_cpu().startswith("/proc/cpuinfo")
        True
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    return f"/proc/cpuinfo flags {', '.join(found)}" if found else None


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def oversubscription_warning(threads: int) -> str | None:
    """A warning text when the 1-minute load average is above the usable physical cores, else None.

    Args:
        threads: the thread count the run will use (named in the message).
    Returns:
        The message, or None on a machine with spare cores (or no load average).
    """
    load, cores = load_average(), physical_cores()
    if load is None or load <= cores:
        return None
    advice = (" and several threads slow each other down; run on an idle machine, or use --threads 1 "
              "(DistillConfig(threads=1))") if threads > 1 else "; run on an idle machine for figures that count"
    return (f"the machine is oversubscribed (1-minute load average {load:.1f} > {cores} usable physical cores) with "
            f"{threads} training thread(s): step times and tokens/s measured now mean nothing{advice}")


def warn(message: str) -> None:
    """Emit a run warning (``UserWarning``) from the caller's caller."""
    warnings.warn(message, UserWarning, stacklevel=3)


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count afterwards.

    Args:
        n: intra-op threads (>= 1).
    Yields:
        ``n``.
    Example:
        >>> with torch_threads(1):
        ...     pass
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
