"""Fixtures shared by the test modules; plain helpers are in ``tests/helpers.py``.

The Triton interpreter is set up in ``tests/kernels/conftest.py`` (the one place): nothing here
imports transformers or triton at import time.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import COMMON, FAMILY_NAMES


@pytest.fixture(params=sorted(FAMILY_NAMES))
def family(request) -> str:
    return request.param


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny models: more threads only add contention on a shared CPU).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (10, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def teacher_and_data():
    """A random teacher with peaked next-token distributions, and text sampled from it (KD has signal)."""
    from tests.helpers import T, V, tiny

    torch.set_num_threads(1)
    teacher = tiny(seed=0).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(25)  # logits std ~3: low-entropy, context-dependent distributions
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        data = torch.randint(0, V, (320, 1), generator=g)
        for _ in range(T - 1):  # full-context recompute: no KV-cache API, which differs across versions
            logits = teacher(data, use_cache=False).logits[:, -1].float()  # (320, V)
            data = torch.cat([data, torch.multinomial(logits.softmax(-1), 1, generator=g)], 1)
    # data: (320, T)
    return teacher, data[:256], data[256:]
