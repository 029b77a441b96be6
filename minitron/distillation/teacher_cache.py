"""Offline teacher: cache its top-k logits once, distill later with no teacher in memory.

:func:`cache_teacher_logits` runs the teacher over the training blocks and writes, per token, the
top-k logits and ids and ``lse = logsumexp(logits / temperature)`` of the full distribution (so the
KD loss is exact about the mass outside the top-k: :func:`minitron.losses.cached.topk_tail_kd_loss`),
in safetensors shards with a ``manifest.json``:

    manifest.json            format, top_k, temperature, seq_len, vocab_size, teacher (class, path,
                             shapes and weights digests, soft-cap), tokenizer (path, vocab digest),
                             data (n_blocks, seq_len, digest of the token ids), shards
    shard-00000.safetensors  ids (b, T, k) int32, logits (b, T, k) fp32, lse (b, T) fp32

:class:`TeacherCache` opens a cache, refuses it for other data, tokenizer, top-k or temperature
(:meth:`TeacherCache.check`, one-line errors naming the difference) and reads the rows of any blocks.
Disk: ``8 k + 4`` bytes per token.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.adapters import base_decoder, lm_head_params
from minitron.distillation.config import DEFAULT_DISTILL_SEQ_LEN
from minitron.distillation.data import load_blocks
from minitron.distillation.run_dir import data_digest, tensor_shapes
from minitron.losses.cross_entropy import softcap_of
from minitron.losses.linear_kd import shared_vocab_head

__all__ = ["CACHE_FORMAT", "MANIFEST", "TeacherCache", "cache_teacher_logits", "tokenizer_digest", "weights_digest"]

MANIFEST = "manifest.json"
CACHE_FORMAT = "minitron-teacher-topk-v1"


def weights_digest(model: nn.Module) -> str:
    """BLAKE2b digest of every tensor of ``model``'s state dict (names, dtypes, shapes and bytes).

    Args:
        model: any module (its state dict is read once, on the CPU).
    Returns:
        32 hex characters.
    Example:
        >>> weights_digest(torch.nn.Linear(2, 2))[:8]
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else b"")
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str | None:
    """BLAKE2b digest of a tokenizer's vocabulary (token -> id), None without a tokenizer.

    Args:
        tokenizer: anything with ``get_vocab()``, or None.
    Returns:
        32 hex characters, or None.
    Example:
        >>> tokenizer_digest(None) is None
        True
    """
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(json.dumps(vocab).encode(), digest_size=16).hexdigest()


@torch.no_grad()
def _topk_rows(teacher: nn.Module, x: torch.Tensor, top_k: int, temperature: float, vocab: int, chunk: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher (b, T) token ids -> ids (b, T, k) int32, logits (b, T, k) fp32, lse (b, T) fp32."""
    h = base_decoder(teacher)(input_ids=x, use_cache=False).last_hidden_state  # (b, T, Ht)
    w, bias = shared_vocab_head(*lm_head_params(teacher), vocab)  # (V, Ht)
    cap = softcap_of(teacher)
    flat = h.reshape(-1, h.shape[-1])
    ids, vals, lse = [], [], []
    for i in range(0, flat.shape[0], chunk):
        z = flat[i:i + chunk].float() @ w.float().t()  # (c, V) fp32
        if bias is not None:
            z += bias.float()
        if cap:
            z = torch.tanh(z / cap) * cap
        top = z.topk(top_k, dim=-1)
        ids.append(top.indices.to(torch.int32))
        vals.append(top.values)
        lse.append(torch.logsumexp(z / temperature, dim=-1))
    b, t = x.shape
    return torch.cat(ids).reshape(b, t, top_k), torch.cat(vals).reshape(b, t, top_k), torch.cat(lse).reshape(b, t)


def cache_teacher_logits(teacher: nn.Module, data: Any, out: str | Path, *, top_k: int, tokenizer: Any = None,
                         seq_len: int | None = None, temperature: float = 1.0, vocab_size: int | None = None,
                         batch_size: int = 8, shard_blocks: int = 4096, chunk_size: int = 1024,
                         chat_template: bool = False) -> Path:
    """Write the teacher's top-k logits, ids and full log-sum-exp for every token of ``data``.

    Args:
        teacher: a Hugging Face causal LM (run in eval mode, no grad, where its weights are).
        data: anything :func:`minitron.distill` takes (texts, token ids, ``.txt``/``.jsonl``/``.pt`` paths).
        out: a new or empty directory.
        top_k: ids kept per token (1 <= k <= vocabulary).
        tokenizer: for text data; its vocabulary digest goes into the manifest.
        seq_len: tokens per block (None: a (B, S) token-id tensor's S, else 1024 capped by the model).
        temperature: the distillation temperature the stored ``lse`` is computed at.
        vocab_size: keep the first ``vocab_size`` lm_head rows (a student's vocabulary when the teacher's
            has padding rows); default all.
        batch_size: blocks per teacher forward.
        shard_blocks: blocks per safetensors shard.
        chunk_size: tokens per logits chunk (memory O(chunk_size * V)).
        chat_template: as in :func:`minitron.distill`.
    Returns:
        The cache directory.
    Example:
        >>> cache_teacher_logits(teacher, "train.jsonl", "cache/", top_k=64, tokenizer=tok, seq_len=1024)
    """
    from safetensors.torch import save_file

    from minitron.data import resolve_seq_len

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"cache directory {out} exists and is not empty: pass a new or empty directory")
    vocab = int(lm_head_params(teacher)[0].shape[0]) if vocab_size is None else int(vocab_size)
    if not (isinstance(top_k, int) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k={top_k!r} must be an integer in [1, {vocab}] (the vocabulary)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    seq_len = resolve_seq_len(data, seq_len, [teacher], default=DEFAULT_DISTILL_SEQ_LEN)
    blocks = load_blocks(data, tokenizer, seq_len, chat_template=chat_template)  # (n, T)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    try:
        for s0 in range(0, blocks.shape[0], shard_blocks):
            part = blocks[s0:s0 + shard_blocks]
            rows = [_topk_rows(teacher, part[i:i + batch_size].to(device), top_k, temperature, vocab, chunk_size)
                    for i in range(0, part.shape[0], batch_size)]
            name = f"shard-{len(shards):05d}.safetensors"
            save_file({"ids": torch.cat([r[0] for r in rows]).cpu().contiguous(),
                       "logits": torch.cat([r[1] for r in rows]).cpu().contiguous(),
                       "lse": torch.cat([r[2] for r in rows]).cpu().contiguous()}, str(out / name))
            shards.append({"file": name, "first_block": s0, "n_blocks": int(part.shape[0])})
    finally:
        teacher.train(was_training)
    manifest = {
        "format": CACHE_FORMAT, "top_k": top_k, "temperature": float(temperature), "seq_len": int(seq_len),
        "vocab_size": vocab,
        "teacher": {"class": type(teacher).__name__, "name_or_path": getattr(teacher, "name_or_path", ""),
                    "shapes_digest": hashlib.blake2b(json.dumps(tensor_shapes(teacher)).encode(), digest_size=16
                                                     ).hexdigest(),
                    "weights_digest": weights_digest(teacher), "softcap": softcap_of(teacher)},
        "tokenizer": {"name_or_path": getattr(tokenizer, "name_or_path", None), "vocab_digest": tokenizer_digest(tokenizer)},
        "data": {"n_blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]), "digest": data_digest(blocks)},
        "bytes_per_token": 8 * top_k + 4,
        "shards": shards,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


class TeacherCache:
    """A cache written by :func:`cache_teacher_logits`: its manifest, checks and block reads.

    Args:
        path: the cache directory.
    Example:
        >>> cache = TeacherCache("cache/")
        >>> cache.check(train_blocks, tokenizer=tok, top_k=64, temperature=1.0)
        >>> ids, logits, lse = cache.rows(torch.tensor([3, 0, 7]))  # (3, T, k), (3, T, k), (3, T)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise ValueError(f"{self.path} is not a teacher cache (no {MANIFEST}); build one with "
                             "minitron.cache_teacher_logits")
        self.manifest = json.loads(mf.read_text(encoding="utf-8"))
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{mf} has format {self.manifest.get('format')!r}, expected {CACHE_FORMAT!r}: rebuild the cache")
        self.top_k, self.temperature = int(self.manifest["top_k"]), float(self.manifest["temperature"])

    def check(self, blocks: torch.Tensor, tokenizer: Any = None, *, top_k: int | None = None,
              temperature: float | None = None) -> None:
        """Raise a one-line ValueError unless the cache holds these blocks (and tokenizer, k, temperature)."""
        d = self.manifest["data"]
        if (d["n_blocks"], d["seq_len"]) != tuple(blocks.shape):
            raise ValueError(f"teacher cache {self.path} holds {d['n_blocks']} blocks of {d['seq_len']} tokens but the "
                             f"data has {blocks.shape[0]} of {blocks.shape[1]}: rebuild the cache for this data/seq_len")
        if d["digest"] != data_digest(blocks):
            raise ValueError(f"teacher cache {self.path} was built from other tokens than this data: rebuild the "
                             "cache for this data (and tokenizer)")
        want = tokenizer_digest(tokenizer)
        have = self.manifest["tokenizer"]["vocab_digest"]
        if want is not None and have is not None and want != have:
            raise ValueError(f"teacher cache {self.path} was built with another tokenizer "
                             f"({self.manifest['tokenizer']['name_or_path']}): rebuild it with this tokenizer")
        if top_k is not None and top_k != self.top_k:
            raise ValueError(f"teacher cache {self.path} holds top_k={self.top_k}, not {top_k}: rebuild it or use "
                             f"top_k={self.top_k}")
        if temperature is not None and float(temperature) != self.temperature:
            raise ValueError(f"teacher cache {self.path} was built at temperature {self.temperature}, not "
                             f"{temperature}: rebuild it at this temperature")

    def rows(self, block_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (b, T, k) int64, logits (b, T, k) fp32, lse (b, T) fp32 of the given blocks, in their order."""
        from safetensors import safe_open

        idx = [int(i) for i in block_indices.reshape(-1).tolist()]
        out: dict[str, list] = {"ids": [None] * len(idx), "logits": [None] * len(idx), "lse": [None] * len(idx)}
        for sh in self.manifest["shards"]:
            lo, hi = sh["first_block"], sh["first_block"] + sh["n_blocks"]
            mine = [(j, b - lo) for j, b in enumerate(idx) if lo <= b < hi]
            if not mine:
                continue
            with safe_open(str(self.path / sh["file"]), framework="pt") as f:
                for key in out:
                    sl = f.get_slice(key)
                    for j, r in mine:
                        out[key][j] = sl[r:r + 1]
        missing = [b for j, b in enumerate(idx) if out["ids"][j] is None]
        if missing:
            raise ValueError(f"teacher cache {self.path} has no block {missing[0]} (it holds "
                             f"{self.manifest['data']['n_blocks']})")
        return torch.cat(out["ids"]).long(), torch.cat(out["logits"]), torch.cat(out["lse"])


def as_teacher_cache(teacher: Any) -> TeacherCache | None:
    """The :class:`TeacherCache` ``teacher`` names (a cache or its directory), None for a teacher model.

    Args:
        teacher: what :func:`minitron.distill` got as its teacher.
    Returns:
        The opened cache, or None when ``teacher`` is a model.
    Example:
        >>> as_teacher_cache("cache/").top_k
        64
    Raises:
        ValueError: a path that is not a teacher cache.
    """
    if isinstance(teacher, TeacherCache):
        return teacher
    if isinstance(teacher, (str, Path)):
        return TeacherCache(teacher)  # raises for a directory without a manifest
    return None


def check_cached_run(cache: TeacherCache, cfg: Any, student: nn.Module, blocks: torch.Tensor, tokenizer: Any) -> None:
    """Raise a one-line ValueError unless ``distill`` can train ``student`` on ``blocks`` from ``cache``.

    Args:
        cache: the offline teacher.
        cfg: the run's :class:`~minitron.distillation.DistillConfig` (forward KL, no intermediate layers,
            its ``top_k`` None or the cache's, the cache's temperature).
        student: the model to train (its vocabulary must hold every cached id).
        blocks: (n, T) training token ids (must be the cached ones).
        tokenizer: the run's tokenizer (its vocabulary must be the cache's when both are known).
    Example:
        >>> check_cached_run(TeacherCache("cache/"), cfg, student, train_blocks, tok)
    """
    if cfg.intermediate_layers:
        raise ValueError("intermediate_layers need the teacher's hidden states, which a teacher cache does not hold: "
                         "drop intermediate_layers or pass the teacher model")
    if cfg.logits_loss != "forward_kl":
        raise ValueError(f"logits_loss={cfg.logits_loss!r} with a teacher cache: only forward_kl (top-k + tail) "
                         "is defined from cached logits; use logits_loss='forward_kl' or the teacher model")
    cache.check(blocks, tokenizer, top_k=cfg.top_k, temperature=cfg.temperature)
    vs = int(lm_head_params(student)[0].shape[0])
    if int(cache.manifest["vocab_size"]) > vs:
        raise ValueError(f"teacher cache {cache.path} ranks {cache.manifest['vocab_size']} ids but the student has {vs}: "
                         f"rebuild it with cache_teacher_logits(..., vocab_size={vs})")
