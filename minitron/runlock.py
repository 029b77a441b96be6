"""One process per output directory: an exclusive lock file ``<dir>/.minitron.lock``.

The lock is an ``flock`` on that file (released by the kernel when the process dies, so a lock
left by a killed run is taken over), and the file records the holder's pid for the error message.
On platforms without ``fcntl`` the pid alone decides: a lock whose pid no longer runs is stale.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import pid_alive

LOCK_NAME = ".minitron.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class OutputInUseError(ValueError):
    """Another running process holds the output directory's lock."""


class RunLock:
    """An acquired lock; :meth:`release` (or leaving the ``with`` block) frees it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Free the lock (idempotent)."""
        if self._fd < 0:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = -1
        if fcntl is None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(path: Path) -> int:
    try:
        return int(path.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return -1


def acquire(directory: str | os.PathLike) -> RunLock:
    """Lock ``directory`` (which must exist) for this process.

    Args:
        directory: the output directory.
    Returns:
        The held :class:`RunLock`.
    Raises:
        OutputInUseError: a live process holds the lock; the message names its pid.
        ValueError: the lock file is a symbolic link (never followed).
    """
    path = Path(directory) / LOCK_NAME
    if path.is_symlink():  # the pid would be written into, and the file truncated behind, the link
        raise ValueError(f"{path} is a symbolic link; minitron never writes through a link: remove it")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)  # and no link slipped in after that check
    if fcntl is None:  # pragma: no cover - Windows: pid file only
        pid = _holder(path)
        if path.exists() and pid != os.getpid() and pid_alive(pid):
            raise OutputInUseError(f"{directory} is in use by another minitron process (pid {pid}); wait for it to "
                                   "finish or use another output directory")
        fd = os.open(path, flags | os.O_TRUNC, 0o644)
    else:
        fd = os.open(path, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = _holder(path)
            who = f"pid {pid}" if pid > 0 else "pid unknown"
            raise OutputInUseError(f"{directory} is in use by another minitron process ({who}); wait for it to "
                                   "finish or use another output directory") from None
        os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(path, fd)
