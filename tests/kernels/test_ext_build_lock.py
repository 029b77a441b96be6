"""The extension's first-use JIT build never hangs on a lock: a killed build's lock is cleared, a live
build is waited for only ``MINITRON_EXT_LOCK_TIMEOUT`` seconds before the pure-PyTorch fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from minitron.ops import _loader

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks and process groups")

BUILD = "from minitron.ops import _loader; _loader._jit_build(); print('built', flush=True)"


def _env(build_dir, **extra) -> dict:
    env = dict(os.environ, MINITRON_EXT_DIR=str(build_dir), PYTHONWARNINGS="always", **extra)
    env.pop("MINITRON_NO_JIT", None)
    return env


def test_killed_build_leaves_a_lock_that_the_next_build_clears(tmp_path):
    build_dir = tmp_path / "ext"
    torch_lock = build_dir / _loader.TORCH_BUILD_LOCK
    first = subprocess.Popen([sys.executable, "-c", BUILD], env=_env(build_dir), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not torch_lock.exists():  # torch creates it right before running ninja
            assert first.poll() is None, "the build ended before it could be interrupted"
            assert time.monotonic() < deadline, "the build never took its lock"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the build and its ninja / compiler children
        first.wait()
    assert torch_lock.exists()  # what a kill -9 leaves behind (torch's FileBaton is a plain file)

    # Before the fix the next build polled that file forever at 0% CPU.
    second = subprocess.run([sys.executable, "-c", BUILD], env=_env(build_dir), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "built" in second.stdout
    assert "stale build lock" in second.stderr and str(torch_lock) in second.stderr
    assert not torch_lock.exists()


def test_live_build_is_waited_for_a_bounded_time_then_falls_back(tmp_path, monkeypatch):
    build_dir = tmp_path / "ext"
    build_dir.mkdir()
    flock = build_dir / _loader.BUILD_FLOCK
    holder_code = textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(flock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(120)
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("MINITRON_EXT_DIR", str(build_dir))
        monkeypatch.setenv("MINITRON_EXT_LOCK_TIMEOUT", "0.5")
        monkeypatch.delenv("MINITRON_NO_JIT", raising=False)
        monkeypatch.delenv("MINITRON_GATHER_BACKEND", raising=False)
        monkeypatch.setattr(_loader, "_prebuilt_spec", lambda: None)
        monkeypatch.setattr(_loader, "_STATE", {"tried": False, "module": None, "error": None})
        t0 = time.monotonic()
        with pytest.warns(RuntimeWarning, match="pure-PyTorch") as record:
            assert _loader.load_extension() is None
        assert time.monotonic() - t0 < 30
        message = " ".join(str(w.message) for w in record)
        assert str(flock) in message and "MINITRON_EXT_LOCK_TIMEOUT" in message
    finally:
        holder.kill()
        holder.wait()


def test_lock_timeout_must_be_a_number(monkeypatch):
    monkeypatch.setenv("MINITRON_EXT_LOCK_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="MINITRON_EXT_LOCK_TIMEOUT"):
        _loader._lock_timeout_s()
