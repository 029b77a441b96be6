"""compact_ on memory-mapped weights (what stock from_pretrained / safetensors load_file return).

The storage of such a tensor cannot be resized, so compact_ builds a private kept copy chunk by
chunk and drops the source's file pages as it goes. Checked here: the result equals index_select,
the source pages are no longer resident, the old storage still reads the original values, and
pages written through the private mapping are never dropped.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from minitron.ops import mapped
from minitron.ops.gather import compact_

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memory maps via /proc (Linux)")
PAGE = mapped.PAGE


def _load_mapped(tmp_path, src: torch.Tensor) -> torch.Tensor:
    save_file({"w": src}, str(tmp_path / "w.safetensors"))
    t = load_file(str(tmp_path / "w.safetensors"))["w"]
    assert not t.untyped_storage().resizable(), "safetensors no longer memory-maps: this test needs a mapped tensor"
    assert mapped.file_mapping(t) is not None
    return t


def _sorted_subset(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


@pytest.mark.parametrize("shape,dim", [((300, 1000), 0), ((300, 1000), 1), ((5000,), 0), ((1000, 3), 0)])
def test_compact_of_mapped_tensor_releases_source_pages(tmp_path, shape, dim):
    src = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    t = _load_mapped(tmp_path, src)
    assert torch.equal(t, src)  # faults every page in
    nbytes = t.numel() * t.element_size()
    assert mapped.resident_bytes(t) >= nbytes - 2 * PAGE
    old = t.detach()  # another view of the mapped storage, as a caller might hold
    index = _sorted_subset(shape[dim], shape[dim] // 2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CompactFallbackWarning: this is not the copy path
        out = compact_(t, dim, index, _stage_bytes=64 << 10)  # several chunks
    assert torch.equal(out, src.index_select(dim, index))
    assert t.data_ptr() == out.data_ptr() and t.shape == out.shape  # the input is re-pointed
    assert mapped.file_mapping(out) is None  # private memory
    assert mapped.resident_bytes(old) == 0  # every whole page of the source was dropped...
    assert torch.equal(old, src)  # ...and still reads the original values (re-read from the file)


def test_pages_written_through_the_private_mapping_are_kept(tmp_path):
    src = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))  # 4 KiB rows
    t = _load_mapped(tmp_path, src)
    expected = src.clone()
    with torch.no_grad():
        t[3] = 7.0  # copy-on-write: these pages now hold the only copy of the data
        t[200, :10] = -1.0
    expected[3], expected[200, :10] = 7.0, -1.0
    old = t.detach()
    index = _sorted_subset(256, 100, seed=2)
    out = compact_(t, 0, index, _stage_bytes=32 << 10)
    written = 2 * 4096  # rows 3 and 200: one page each, or two when a row straddles a page boundary
    assert written <= mapped.resident_bytes(old) <= 2 * written  # everything else was dropped
    assert torch.equal(out, expected.index_select(0, index))
    assert torch.equal(old, expected)  # the written rows were not reverted to the file contents


def test_release_pages_only_touches_file_mappings(tmp_path):
    src = torch.randn(64, 1024)
    t = _load_mapped(tmp_path, src)
    assert torch.equal(t, src)
    assert mapped.release_pages_(t) >= t.numel() * 4 - 2 * PAGE
    assert mapped.resident_bytes(t) == 0 and torch.equal(t, src)
    ram = torch.randn(64, 1024)
    assert mapped.file_mapping(ram) is None and mapped.release_pages_(ram) == 0
    assert mapped.resident_bytes(ram) > 0


def test_gather_release_rejects_unmapped_tensors():
    with pytest.raises(ValueError, match="backed by a file mapping"):
        mapped.gather_release(torch.randn(4, 4), 0, torch.tensor([0, 2]))
