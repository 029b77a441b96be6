"""GGUF files: refused with the file named when they hold no (or cut-off) weights; the dequantised
cache is keyed by content, rebuilt when unreadable, and never holds random weights."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from minitron.models import load_model
from tests.helpers import save_checkpoint, write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MINITRON_CACHE", str(root))
    return root


def entries(cache) -> list:
    return sorted((cache / "gguf").iterdir()) if (cache / "gguf").is_dir() else []


def test_gguf_without_tensors_is_refused_and_never_cached(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "tok-only.gguf", with_tensors=False)
    for _ in range(2):  # the second load finds nothing cached either
        with pytest.raises(ValueError, match=f"{path} holds no weights"):
            load_model(path)
    assert entries(cache) == []


def test_truncated_gguf_names_the_file(tmp_path, cache):
    full = write_tiny_gguf(tmp_path / "full.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[: len(full) * 2 // 3])
    with pytest.raises(ValueError, match=f"{path} is truncated"):
        load_model(path)
    assert entries(cache) == []


def test_cache_is_keyed_by_content_not_path_size_mtime(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "m.gguf", seed=0)
    stat = path.stat()
    first, _ = load_model(path)
    write_tiny_gguf(path, seed=1)  # other weights, same size; the mtime put back
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second, _ = load_model(path)
    fresh, _ = load_model(path, cache=False)
    w = lambda m: m.model.layers[0].mlp.up_proj.weight  # noqa: E731
    assert not torch.equal(w(second), w(first)) and torch.equal(w(second), w(fresh))
    assert len(entries(cache)) == 2


def test_unreadable_cache_entry_is_rebuilt_and_logged_truthfully(tmp_path, cache, caplog):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    caplog.set_level(logging.INFO, logger="minitron")
    reference, _ = load_model(path)
    [entry] = entries(cache)
    assert "cached the dequantised model" in caplog.text
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a cache entry cut off by a full disk
    caplog.clear()
    rebuilt, _ = load_model(path)
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text and "cached the dequantised" in caplog.text
    assert weights.stat().st_size > 1000 and entries(cache) == [entry]
    caplog.clear()
    again, _ = load_model(path)
    assert "dequantising" not in caplog.text  # read from the rebuilt entry
    for m in (rebuilt, again):
        assert torch.equal(m.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_failed_cache_write_is_not_called_cached(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("MINITRON_CACHE", str(blocker))
    caplog.set_level(logging.INFO, logger="minitron")
    load_model(write_tiny_gguf(tmp_path / "m.gguf"))
    assert "could not cache" in caplog.text
    assert [r.getMessage() for r in caplog.records if "cached" in r.getMessage()] == []  # no line claims a cache


def test_folder_named_like_a_gguf_file(tmp_path):
    model, _ = load_model(save_checkpoint(tmp_path / "ckpt.gguf"))  # a checkpoint folder: loaded as one
    assert model.config.hidden_size == 48
    (tmp_path / "empty.gguf").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.gguf, a directory named like a GGUF file, has no config.json"):
        load_model(tmp_path / "empty.gguf")
    with pytest.raises(ValueError, match="is a directory, not a GGUF file"):
        load_model(tmp_path, gguf_file="empty.gguf")
