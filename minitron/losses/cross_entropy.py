"""Chunked next-token cross-entropy from hidden states and the lm_head weight.

Each chunk of ``chunk_size`` tokens computes its (chunk, V) fp32 logits, reduces them to a summed
loss and drops them; with grad enabled the chunk is recomputed in backward (activation
checkpointing), so the full (N, V) logits and their gradient never exist at once. Used by the
CLM term of distillation. Evaluation (:func:`minitron.evaluation.lm_loss`) uses the no-grad
:func:`cross_entropy_sum_vocab_tiled`, which also tiles the vocabulary.

``softcap`` (Gemma 2's ``config.final_logit_softcapping``) caps the logits as the model's own
forward does, ``cap * tanh(logits / cap)``, before the softmax (:func:`softcap_of` reads it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["cross_entropy_sum_vocab_tiled", "linear_cross_entropy", "linear_cross_entropy_sum", "next_token_loss_sum",
           "softcap_of"]


def softcap_of(model) -> float | None:
    """The final-logit soft-cap of ``model`` (``config.final_logit_softcapping``; None when it has none)."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _ce_chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor, ignore_index: int,
              softcap: float | None = None) -> torch.Tensor:
    logits = h.float() @ w.float().t()  # (c, V) fp32
    if b is not None:
        logits = logits + b.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")


def linear_cross_entropy(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,)
    bias: torch.Tensor | None = None,  # (V,)
    ignore_index: int = -100,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` vs ``labels`` over non-ignored tokens.

    Works on ``chunk_size`` tokens at a time with activation checkpointing, so peak memory is
    O(chunk_size * V) instead of O(N * V).

    Args:
        hidden: (N, H) final (normed) hidden states.
        weight: (V, H) lm_head weight.
        labels: (N,) target ids, ``ignore_index`` where not counted.
        bias: optional (V,) lm_head bias.
        ignore_index: label value that is not counted.
        chunk_size: tokens per chunk.
        softcap: final-logit soft-cap ``cap * tanh(logits / cap)`` (Gemma 2), None for none.
    Returns:
        Scalar fp32 mean CE (0 if no token counts).
    Example:
        >>> linear_cross_entropy(torch.randn(10, 8), torch.randn(50, 8), torch.randint(0, 50, (10,)))
    """
    total = linear_cross_entropy_sum(hidden, weight, labels, bias, ignore_index, chunk_size, softcap)
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count


def linear_cross_entropy_sum(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,)
    bias: torch.Tensor | None = None,  # (V,)
    ignore_index: int = -100,
    chunk_size: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over non-ignored tokens; arguments as :func:`linear_cross_entropy`.

    Returns:
        Scalar fp32 sum of the per-token losses.
    Example:
        >>> linear_cross_entropy_sum(torch.randn(10, 8), torch.randn(50, 8), torch.randint(0, 50, (10,)))
    """
    n = hidden.shape[0]
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for i in range(0, n, chunk_size):
        h, y = hidden[i : i + chunk_size], labels[i : i + chunk_size]
        if grad:
            total = total + checkpoint(_ce_chunk, h, weight, bias, y, ignore_index, softcap, use_reentrant=False)
        else:
            total = total + _ce_chunk(h, weight, bias, y, ignore_index, softcap)
    return total


def cross_entropy_sum_vocab_tiled(
    hidden: torch.Tensor,  # (N, H)
    weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,)
    bias: torch.Tensor | None = None,  # (V,)
    ignore_index: int = -100,
    tile_bytes: int = 16 << 20,
    max_tokens: int = 4096,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy (no grad) in (tokens, vocab) tiles of about ``tile_bytes`` fp32 logits.

    The vocabulary is walked in slices of ``Vc`` rows, keeping a running ``logsumexp`` and the
    target logit per token, so the lm_head weight is read once per ``max_tokens`` tokens (not once
    per small token chunk) and no tile exceeds ``tile_bytes`` whatever V is: evaluation memory stays
    at the model plus a few such tiles (a (1024, V) fp32 chunk is 200 MiB at V=49152, 0.4x a
    135M model). A bf16 weight is upcast one slice at a time.

    Args:
        hidden: (N, H) final (normed) hidden states.
        weight: (V, H) lm_head weight.
        labels: (N,) target ids, ``ignore_index`` where not counted.
        bias: optional (V,) lm_head bias.
        ignore_index: label value that is not counted.
        tile_bytes: size of one fp32 logits tile.
        max_tokens: tokens per pass over the vocabulary.
        softcap: final-logit soft-cap ``cap * tanh(logits / cap)`` (Gemma 2), None for none.
    Returns:
        Scalar fp32 sum of the per-token losses (equal to :func:`linear_cross_entropy_sum`).
    Example:
        >>> cross_entropy_sum_vocab_tiled(torch.randn(10, 8), torch.randn(50, 8), torch.randint(0, 50, (10,)))
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    vocab = weight.shape[0]
    # reading every row of a memory-mapped lm_head (the tied embedding) would leave the whole file
    # range resident on top of the model's peak: drop each slice's clean pages once read
    from ..ops.mapped import page_releaser

    release = page_releaser(weight)
    with torch.no_grad():
        for i in range(0, hidden.shape[0], max_tokens):
            h = hidden[i : i + max_tokens].float()  # (n, H)
            y = labels[i : i + max_tokens]
            n = h.shape[0]
            rows = max(64, min(vocab, tile_bytes // (4 * n)))  # vocab rows per tile
            lse = torch.full((n,), float("-inf"), device=h.device)  # running logsumexp (n,)
            target = torch.zeros(n, device=h.device)  # logit of the label (n,)
            valid = y != ignore_index
            y_safe = torch.where(valid, y, torch.zeros_like(y))
            for v0 in range(0, vocab, rows):
                logits = h @ weight[v0 : v0 + rows].float().t()  # (n, Vc) fp32
                if bias is not None:
                    logits += bias[v0 : v0 + rows].float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                if release is not None:  # this slice of a memory-mapped lm_head is done: drop its pages
                    release(weight[v0 : v0 + rows])
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                here = (y_safe >= v0) & (y_safe < v0 + logits.shape[1])
                if here.any():
                    idx = here.nonzero().squeeze(1)
                    target[idx] = logits[idx, y_safe[idx] - v0]
            total = total + (lse - target)[valid].sum()
    return total


def next_token_loss_sum(
    hidden: torch.Tensor,  # (B, S, H) final (normed) hidden states
    ids: torch.Tensor,  # (B, S) the token ids they were computed from
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None = None,  # (V,)
    chunk_size: int = 1024,
    softcap: float | None = None,  # final-logit soft-cap (Gemma 2)
) -> tuple[float, int]:
    """Summed next-token cross-entropy of a block batch: position s predicts token s + 1.

    Returns:
        ``(total, tokens)``: the summed loss (nats, a Python float) and the number of predicted tokens.
    Example:
        >>> next_token_loss_sum(torch.randn(2, 5, 8), torch.randint(0, 50, (2, 5)), torch.randn(50, 8))[1]
        8
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(S-1), H)
    labels = ids[:, 1:].reshape(-1)  # (B*(S-1),)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return linear_cross_entropy_sum(h, weight, labels, bias, chunk_size=chunk_size, softcap=softcap).item(), \
            labels.numel()
    # evaluation: vocabulary tiles of ~16 MiB, so perplexity adds ~nothing to the model's memory
    return cross_entropy_sum_vocab_tiled(h, weight, labels, bias, max_tokens=max(chunk_size, 4096),
                                         softcap=softcap).item(), labels.numel()
