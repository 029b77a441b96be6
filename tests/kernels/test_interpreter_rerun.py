"""The Triton interpreter re-runs cannot pass by skipping: a fresh process with TRITON_INTERPRET=1 can run
Triton whenever triton imports, and a re-run fails on any skip whose reason is not explicitly allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import check_skips, have_triton

ROOT = Path(__file__).resolve().parents[2]


def test_a_rerun_fails_on_a_skipped_triton_test():
    ok = "12 passed, 1 skipped in 3.0s\nSKIPPED [1] tests/kernels/test_fused_kl.py:230: Triton tests already ran in-process"
    check_skips(ok, r"already ran in-process")
    check_skips("5 passed in 1.0s", None)
    triton_skipped = ("SKIPPED [8] tests/kernels/test_fused_kl.py:40: triton not runnable here\n"
                      "4 passed, 8 skipped in 2.0s")
    with pytest.raises(AssertionError, match="triton not runnable here"):
        check_skips(triton_skipped, r"could not import 'liger_kernel'|already ran in-process")
    with pytest.raises(AssertionError, match="skipped in the Triton interpreter run"):
        check_skips(triton_skipped, None)
    with pytest.raises(AssertionError, match="without a reported reason"):
        check_skips("4 passed, 8 skipped in 2.0s", r".*")


@pytest.mark.skipif(not have_triton(), reason="triton is not installed: there is nothing to run")
def test_triton_is_runnable_in_a_fresh_interpreter_process():
    """What every re-run relies on: with TRITON_INTERPRET=1 from the start, triton_runnable() is true."""
    code = "from tests.helpers import triton_runnable; print(triton_runnable())"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "True"
