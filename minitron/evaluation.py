"""Evaluation: the LM loss of a model on token blocks, and the decoder stream the ablations re-run.

Every loss here runs the decoder stack and then the chunked cross-entropy of
:mod:`minitron.losses.cross_entropy` (:func:`~minitron.losses.cross_entropy.next_token_loss_sum`):
``chunk_size`` tokens at a time, so no full (B, S, V) fp32 logits tensor ever exists.

Removing a decoder layer (the perplexity depth criterion of Minitron) or one attention head
(zeroing its slice of the ``o_proj`` input) changes nothing before that layer, so the decoder
prefix is computed once: :class:`DecoderStream` keeps the input of the current layer for every
batch and only the layers from the ablated one onward are re-run.

Cost on ``n`` blocks of an ``L``-layer model, counted in forwards of the whole model over those
blocks (``F``), lm_head included in each count:
- :func:`lm_loss`: 1 F;
- one layer dropped at a time (:func:`minitron.importance.ablation.layer_drop_losses`): ~``L / 2 + 1`` F;
- one head dropped at a time (:func:`minitron.importance.ablation.head_drop_losses`): ~``n_heads * L / 2`` F.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import FamilyAdapter, decoder_layers, get_adapter, layer_output
from .losses.cross_entropy import cross_entropy_sum_vocab_tiled, softcap_of
from .offload import execution_device, onloaded
from .validate import check_token_ids

# fp32 logits per vocabulary tile of the evaluation cross-entropy. 4 MiB, not the loss's 16 MiB default:
# the tiles and their logsumexp temporaries come from the C heap (under glibc's dynamic mmap threshold),
# where 16 MiB ones left up to ~90 MiB of freed holes resident during one lm_loss on SmolLM2-135M (live:
# ~40 MiB); 4 MiB tiles kept it at the decoder's own ~45 MiB, and the pass ran no slower (the lm_head is
# still read once per 4096 tokens)
EVAL_TILE_BYTES = 4 << 20

__all__ = ["DecoderStream", "eval_mode", "layer_output", "lm_loss",
           "perplexity"]


def _next_token_loss_sum(hidden: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         chunk_size: int, softcap: float | None) -> tuple[float, int]:
    """:func:`~minitron.losses.cross_entropy.next_token_loss_sum` without grad, in :data:`EVAL_TILE_BYTES` tiles."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B*(S-1), H)
    labels = ids[:, 1:].reshape(-1)  # (B*(S-1),)
    total = cross_entropy_sum_vocab_tiled(h, weight, labels, bias, tile_bytes=EVAL_TILE_BYTES,
                                          max_tokens=max(chunk_size, 4096), softcap=softcap)
    return total.item(), labels.numel()


@torch.no_grad()
def lm_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False,
            chunk_size: int = 1024) -> float:
    """Mean next-token cross-entropy of ``model`` over ``blocks`` (n, S); exp() of it is the perplexity.

    Runs the decoder, then the chunked cross-entropy over ``chunk_size`` tokens at a time
    (:func:`minitron.losses.cross_entropy.next_token_loss_sum`): no (B, S, V) fp32 logits. A final-logit
    soft-cap in the config (Gemma 2's ``final_logit_softcapping``) is applied as the model's forward does.

    Args:
        model: a supported causal LM (decoder stack + final norm + lm_head).
        blocks: LongTensor (n, seq_len).
        batch_size: blocks per forward pass.
        progress: tqdm bar.
        chunk_size: tokens per (chunk, V) logits tile.
    Returns:
        Token-weighted mean loss (nats).
    Example:
        >>> math.exp(lm_loss(model, blocks))  # perplexity
    """
    check_token_ids(model, blocks, "evaluation data")
    device = execution_device(model)
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in tqdm(range(0, blocks.shape[0], batch_size), desc="eval", disable=not progress):
            batch = blocks[start : start + batch_size].to(device)  # (B, S)
            hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state  # (B, S, H), normed
            # the lm_head is read outside its forward: an offloaded one is materialised for the loss only
            with onloaded(head):
                batch_total, batch_tokens = _next_token_loss_sum(hidden, batch, head.weight, getattr(head, "bias", None),
                                                                 chunk_size, softcap_of(model))  # weight (V, H)
            total += batch_total
            tokens += batch_tokens
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean LM loss) of ``model`` on ``blocks``.

    Args:
        model: a supported causal LM.
        blocks: LongTensor (n, seq_len) of token ids.
        batch_size: blocks per forward pass.
    Returns:
        The perplexity (exp of the token-weighted mean next-token loss).
    Example:
        >>> perplexity(model, load_text_blocks(texts, tok, 256))
    """
    return math.exp(lm_loss(model, blocks, batch_size))


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs is captured."""


class DecoderStream:
    """Re-runs the tail of a decoder stack on cached layer inputs.

    Holds, for every calibration batch, the embedding output (the input of layer 0), the input of
    the layer the stream has advanced to, and the keyword arguments the model passes to each
    layer (rotary tables, attention masks: captured once from a real forward, so every family's
    per-layer masks are reproduced exactly).

    Args:
        model: a supported causal LM (put in eval mode by the caller; used under ``no_grad``).
        blocks: LongTensor (n, S) of calibration token ids.
        batch_size: blocks per forward.
        chunk_size: tokens per (chunk, V) logits tile of the cross-entropy.
        resettable: keep the embedding outputs for :meth:`reset` (False: only the current layer inputs
            are held, half the activation memory; the layer-streamed calibration's case).

    Example:
        >>> stream = DecoderStream(model, blocks, 8)
        >>> stream.tail_loss(range(1, model.config.num_hidden_layers))  # layer 0 dropped
    """

    def __init__(self, model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, chunk_size: int = 1024,
                 resettable: bool = True) -> None:
        self.model = model
        self.adapter: FamilyAdapter = get_adapter(model)
        self.layers = decoder_layers(model, self.adapter)
        self.final_norm = model.get_submodule(self.adapter.final_norm)
        self.head = model.get_output_embeddings()  # weight (V, D), read under onloaded() (it may be offloaded)
        self.chunk_size = chunk_size
        self.softcap = softcap_of(model)  # final-logit soft-cap (Gemma 2)
        device = execution_device(model)
        self.ids: list[torch.Tensor] = []  # (B, S) per batch
        self.embedded: list[torch.Tensor] = []  # (B, S, D) input of layer 0 per batch
        self.kwargs: list[list[dict]] = []  # per batch, per layer
        decoder = model.get_submodule(self.adapter.layers.rsplit(".", 1)[0])
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size].to(device)
            captured: list[dict] = []
            first: list[torch.Tensor] = []

            def capture(module, args, kwargs):
                if not captured:
                    first.append(args[0] if args else kwargs["hidden_states"])
                captured.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
                if len(captured) == len(self.layers):
                    raise _StopForward  # every layer's arguments are known: the final norm is not needed

            # layer l's kwargs do not depend on layer l-1's output, so each layer is skipped by
            # replacing its forward with the identity while its pre-hook records the arguments
            handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in self.layers]
            try:
                with _identity_layers(self.layers):
                    decoder(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
            self.ids.append(batch)
            self.embedded.append(first[0])
            self.kwargs.append(captured)
        self.hidden = list(self.embedded)  # (B, S, D) per batch: the input of the next layer to run
        if not resettable:
            self.embedded = []

    def reset(self) -> None:
        """Go back to the input of the first layer."""
        if not self.embedded:
            raise RuntimeError("DecoderStream(resettable=False) keeps no embedding outputs to reset to")
        self.hidden = list(self.embedded)

    def run_layer(self, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer ``index`` on ``hidden`` (B, S, D) with batch ``batch``'s captured arguments (nothing stored)."""
        return self._run(index, batch, hidden)

    def step(self, index: int, batch: int) -> torch.Tensor:
        """Run layer ``index`` on batch ``batch``'s current input; the output (B, S, D) becomes its next input."""
        self.hidden[batch] = self._run(index, batch, self.hidden[batch])
        return self.hidden[batch]

    def _run(self, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        return layer_output(self.layers[index](hidden, **self.kwargs[batch][index]))

    def advance(self, index: int) -> None:
        """Run layer ``index`` on the current inputs: they become the next layer's inputs."""
        self.hidden = [self._run(index, b, h) for b, h in enumerate(self.hidden)]

    def tail_loss(self, layer_ids: Sequence[int]) -> float:
        """Token-mean next-token loss of running ``layer_ids`` (in order) on the current inputs.

        Args:
            layer_ids: original indices of the layers to run, e.g. ``range(l + 1, L)`` to drop layer l.
        Returns:
            Mean cross-entropy in nats over all calibration tokens that have a next token.
        """
        total, tokens = 0.0, 0
        for b, h in enumerate(self.hidden):
            for index in layer_ids:
                h = self._run(index, b, h)
            normed = self.final_norm(h)  # (B, S, D)
            with onloaded(self.head):
                batch_total, batch_tokens = _next_token_loss_sum(
                    normed, self.ids[b], self.head.weight, getattr(self.head, "bias", None), self.chunk_size, self.softcap)
            total += batch_total
            tokens += batch_tokens
        return total / max(tokens, 1)


@contextmanager
def _identity_layers(layers: nn.ModuleList) -> Iterator[None]:
    """Temporarily make every layer return its input (used to capture arguments cheaply)."""
    originals = [layer.forward for layer in layers]
    try:
        for layer in layers:
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states  # noqa: E731
        yield
    finally:
        for layer, forward in zip(layers, originals):
            layer.forward = forward


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
