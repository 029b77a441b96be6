"""``minitron.prune``: calibrate importance, pick what to keep, return a smaller model."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from .adapters import decoder_layers, get_adapter, head_dim_of, moe_sizes, sparse_layers
from .pruning.budget import choose_budget_target
from .data import load_text_blocks, resolve_seq_len
from .heap import trim_heap, trimmed_layers
from .importance.ablation import greedy_layer_removal
from .importance.aggregate import check_aggregation
from .importance.collect import ImportanceConfig, ImportanceScores, collect_importance
from .models import resolve_tokenizer
from .offload import refuse_offloaded
from .ops.mapped import release_unreferenced_pages
from .pruning import (DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC, DEFAULT_HEAD_RESIDUAL, DEFAULT_NORM_RESCALE, Target,
                      apply_plan, make_plan, random_plan)
from .pruning.target import check_divisors
from .pruning.params import budget_of, count_parameters
from .pruning.sizing import target_for_budget
from .validate import check_count, check_finite_scores, check_finite_weights

logger = logging.getLogger(__name__)


def loss_scores_for(importance: ImportanceConfig, target: Target, config, depth_metric: str,
                    head_metric: str) -> ImportanceConfig:
    """``importance`` with the loss-based scores ``target`` needs switched on (a copy).

    Args:
        importance: the caller's calibration options.
        target: the architecture to reach.
        config: the model's config.
        depth_metric / head_metric: the criteria that will rank layers and heads.
    Returns:
        ``importance`` with ``depth_ppl`` set if layers are pruned by ``ppl``, and ``head_loss`` /
        ``head_output`` set if heads are pruned by ``loss`` / ``output``.
    """
    t = target.resolved(config)
    return dataclasses.replace(
        importance,
        depth_ppl=importance.depth_ppl or (depth_metric == "ppl" and t.num_hidden_layers < config.num_hidden_layers),
        head_loss=importance.head_loss or (head_metric == "loss" and t.num_attention_heads < config.num_attention_heads),
        head_output=importance.head_output or (head_metric == "output"
                                               and t.num_attention_heads < config.num_attention_heads),
    )


def _iterative_depth_scores(model: nn.Module, scores: ImportanceScores, target: Target, blocks: torch.Tensor | None,
                            rounds: int, importance: ImportanceConfig | None, progress: bool) -> ImportanceScores:
    """``scores`` whose layer-drop losses rank layers in the order iterative removal drops them."""
    if blocks is None:
        raise ValueError("depth_rounds > 1 re-scores layers on calibration data: pass calib_data=...")
    config = importance or ImportanceConfig()
    n = model.config.num_hidden_layers
    drop = n - target.resolved(model.config).num_hidden_layers
    removed = greedy_layer_removal(model, blocks[: config.ppl_max_blocks], drop, step=math.ceil(drop / rounds),
                                   batch_size=config.batch_size, progress=progress)
    # kept layers outrank every removed one; removed ones rank by removal order (first removed lowest)
    ranked = torch.full((n,), float(n + 1))
    ranked[torch.tensor(removed)] = torch.arange(len(removed), dtype=torch.float32)
    logger.info("iterative depth removal (%d rounds) dropped layers %s", rounds, removed)
    return dataclasses.replace(scores, ppl_loss=ranked)


def prune(
    model: nn.Module,
    calib_data: Any = None,
    target: Target | None = None,
    *,
    params: float | None = None,
    tokenizer: Any = None,
    scores: ImportanceScores | None = None,
    importance: ImportanceConfig | None = None,
    seq_len: int | None = None,
    num_samples: int = 1024,
    batch_agg: str | None = None,
    depth_metric: str = DEFAULT_DEPTH_METRIC,
    depth_mode: str = "scattered",
    depth_rounds: int = 1,
    head_metric: str = DEFAULT_HEAD_METRIC,
    norm_rescale: bool = DEFAULT_NORM_RESCALE,
    head_residual: bool = DEFAULT_HEAD_RESIDUAL,
    budget_blocks: int = 8,
    method: str = "activation",
    seed: int = 0,
    divisors: dict[str, int] | None = None,
    inplace: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> nn.Module:
    """Prune a Hugging Face causal LM Minitron-style.

    Args:
        model: a supported ``*ForCausalLM`` (Llama, Mistral, Qwen2, Qwen3, Starcoder2).
        calib_data: calibration text (Dataset, list of strings, .txt/.jsonl path) or token ids;
            not needed when ``scores`` are given or ``method="random"``.
        target: the architecture to reach; ``None`` fields keep the model's value.
        params: instead of ``target``, a parameter budget (fraction <= 1 or absolute count). With
            calibration data the shape is measured (:func:`minitron.pruning.budget.choose_budget_target`:
            hidden/FFN trade-offs, the lowest calibration loss after pruning wins); without it
            (``scores`` only, or ``method="random"``) :func:`minitron.pruning.sizing.target_for_budget`
            scales hidden and FFN by the same factor.
        tokenizer: tokenizer for text data (default: loaded from the model's local path).
        scores: precomputed :class:`ImportanceScores` (one calibration, many targets).
        importance: aggregation / batching options for calibration.
        seq_len: calibration block length in tokens. Default: a 2-D token-id tensor ``(B, S)`` is used as
            B blocks of S tokens; other data is packed into blocks of 256 tokens (fewer when the model's
            ``max_position_embeddings`` is smaller).
        num_samples: calibration blocks used (official default 1024).
        batch_agg: batch aggregation override (``l2`` | ``mean`` | ``var``).
        depth_metric: ``ppl`` (LM loss with the layer dropped; default, ~L/2 extra forwards over
            ``importance.ppl_max_blocks`` blocks when layers are pruned) or ``bi`` (Block Importance,
            the paper's; free).
        depth_mode: ``scattered`` or ``contiguous`` layer removal.
        depth_rounds: with ``depth_metric="ppl"``, remove the layers over this many rounds, re-scoring
            the shrunk model by layer-drop loss between rounds
            (:func:`minitron.importance.ablation.greedy_layer_removal`; needs ``calib_data``). 1
            (default) is one-shot. Costs ~``depth_rounds`` times the one-shot layer-drop passes;
            on SmolLM2-135M, 30 -> 15 layers in 5 rounds gave held-out ppl 229 vs 342 one-shot.
        head_metric: ``output`` (each head's contribution after o_proj; default), ``input`` (the
            paper's o_proj-input criterion) or ``loss`` (LM loss with the head dropped).
        norm_rescale: after hidden pruning, scale RMSNorm weights by the calibrated kept/full RMS
            ratio (default on).
        head_residual: the paper's head residual: fold dropped heads' o_proj columns into the kept
            heads of their KV group (default on).
        budget_blocks: calibration blocks that score each ``params`` candidate shape.
        method: ``activation`` (Minitron importance) or ``random`` (baseline of the same size).
        seed: seed of the random baseline.
        divisors: optional required divisors per target field, e.g. ``{"hidden_size": 64}``.
        inplace: prune the input model itself and return it. The model, every kept submodule
            and every ``nn.Parameter`` stay the same Python objects (references held by hooks,
            accelerate or PEFT wrappers see the pruned weights; registered hooks keep firing);
            ``model.config`` is updated in place; removed layers leave ``model.model.layers``
            and the kept ones are renumbered. Weights in ordinary RAM are compacted inside their
            own storage; weights memory-mapped from a checkpoint (stock ``from_pretrained``)
            become private copies of their kept part while the file's pages are dropped chunk
            by chunk (the file itself is never written). Either way the pruning step peaks at
            about the model's size plus a few MiB. Tensors taken from the model *before*
            pruning (``w = layer.weight.data``) must not be used afterwards: a RAM weight's
            storage has been shrunk under them. With ``inplace=False`` (default) the input
            model is left untouched and the pruned one is new memory (peak: model + pruned).
        progress: tqdm bars during calibration.
        verbose: log the one-line parameter summary (:func:`pruning_summary`) at INFO (else DEBUG).
    Returns:
        The pruned model, a standard model of the same class (``save_pretrained`` works).
    Raises:
        ValueError: bad target/budget, ``seq_len`` beyond ``max_position_embeddings``, ``num_samples`` < 1,
            NaN/inf in the weights or the importance statistics, token ids outside the vocabulary, a model
            with accelerate-offloaded (cpu/disk) or ``meta`` weights (prune its checkpoint folder with
            :func:`minitron.prune_checkpoint` instead).

    Example:
        >>> small = minitron.prune(model, ["text ..."], minitron.Target(hidden_size=192, intermediate_size=512),
        ...                        tokenizer=tok)
        >>> small.save_pretrained("out/")
    """
    adapter = get_adapter(model)
    refuse_offloaded(model, "minitron.prune")  # before any work: never a half-pruned model
    if method not in ("activation", "random"):
        raise ValueError(f"unknown method={method!r}; allowed values: activation, random")
    if target is not None and params is not None:
        raise ValueError("give either target=Target(...) or params=<budget>, not both")
    if target is None and params is None:
        raise ValueError("nothing to prune: pass target=minitron.Target(...) or params=<fraction or count>")
    if params is not None:  # a bad budget or divisor (or a MoE model) is refused before calibration, not after it
        budget_of(model, params)
        check_divisors(divisors)
    if scores is not None:
        scores.check_matches(model)
    check_finite_weights(model)
    # pages of the checkpoint file the loader read and converted (MoE experts) but no parameter maps
    release_unreferenced_pages([*model.parameters(), *model.buffers()])
    if target is not None:  # cheap checks before any data is read
        target.validate(model.config, divisors)
    if importance is not None and batch_agg is None:
        batch_agg = importance.batch_agg
    if batch_agg is not None:  # checked even when the target prunes no width axis (where it is unused)
        check_aggregation(batch_agg)
    options = dict(batch_agg=batch_agg, depth_metric=depth_metric, depth_mode=depth_mode, head_metric=head_metric,
                   norm_rescale=norm_rescale, head_residual=head_residual)
    if depth_rounds < 1 or (depth_rounds > 1 and (depth_metric != "ppl" or depth_mode != "scattered")):
        raise ValueError(f"depth_rounds={depth_rounds}: must be >= 1, and > 1 only with depth_metric='ppl' and "
                         "depth_mode='scattered' (iterative removal re-scores by layer-drop loss)")
    blocks = None
    if method == "activation" and calib_data is not None and (scores is None or target is None or depth_rounds > 1):
        check_count("num_samples", num_samples)
        seq_len = resolve_seq_len(calib_data, seq_len, [model])
        text_tokenizer = None if isinstance(calib_data, torch.Tensor) else resolve_tokenizer(model, tokenizer)
        blocks = load_text_blocks(calib_data, text_tokenizer, seq_len, num_samples)
    if target is None:
        if blocks is None:
            target = target_for_budget(model, params)
        else:  # measured: every candidate shape prunes hidden and FFN only, so no loss-based scores are needed
            # the C heap (glibc) keeps freed activations resident: trimmed before every layer's forward,
            # and once calibration is over, a pass leaves about one layer's freed activations behind
            # instead of ~0.1-0.2x the model (135M), the same on every run (heap.py)
            with trimmed_layers(decoder_layers(model, adapter)):
                scores = scores or collect_importance(model, blocks, importance or ImportanceConfig(),
                                                      progress=progress)
                trim_heap()
                # candidates are scored on the model itself (masked): no pruned copy raises the peak
                # scored 2 blocks per forward: the candidates' activations stay small next to the model
                # (calibration has just released its own), so the call's peak stays near the model's bytes
                target, _ = choose_budget_target(model, params, scores, blocks[:budget_blocks], plan_options=options,
                                                 batch_size=min(2, (importance or ImportanceConfig()).batch_size))
        target.validate(model.config, divisors)

    if method == "random":
        plan = random_plan(model.config, target, seed)
    else:
        if scores is None:
            if blocks is None:
                raise ValueError("empty calibration data: pass calib_data=... (or precomputed scores=...)")
            # loss-based scores cost extra passes: computed only when this target prunes that axis
            # (a copy: the caller's config stays as given)
            # (iterative removal computes its own layer-drop losses)
            importance = loss_scores_for(importance or ImportanceConfig(), target, model.config,
                                         "bi" if depth_rounds > 1 else depth_metric, head_metric)
            with trimmed_layers(decoder_layers(model, adapter)):
                scores = collect_importance(model, blocks, importance, progress=progress)
        check_finite_scores(scores)
        if depth_rounds > 1 and target.resolved(model.config).num_hidden_layers < model.config.num_hidden_layers:
            scores = _iterative_depth_scores(model, scores, target, blocks, depth_rounds, importance, progress)
        plan = make_plan(scores, target, model.config, **options)

    before = count_parameters(model)
    trim_heap()  # the pruning step starts from the live memory only (in place it adds a few MiB to it)
    pruned = apply_plan(model, plan, inplace=inplace)
    logger.log(logging.INFO if verbose else logging.DEBUG, "%s", pruning_summary(before, pruned))
    return pruned


def pruning_summary(params_before: int, pruned: nn.Module) -> str:
    """One line: parameters before -> after and the pruned architecture.

    Args:
        params_before: parameter count of the unpruned model.
        pruned: the pruned model.
    Returns:
        e.g. ``minitron: 7.30M -> 3.61M parameters (49.5%); hidden 192, ffn 512, heads 6/2 kv, head_dim 32, layers 8``.
    """
    after = count_parameters(pruned)
    c = pruned.config
    moe = moe_sizes(c)
    sparse = sparse_layers(c)
    dense_ffn = f"ffn {c.intermediate_size}, " if not all(sparse) else ""  # the dense MLPs' width, where any exist
    experts = "" if moe["num_experts"] is None else (
        f", experts {moe['num_experts']} (top {c.num_experts_per_tok}) x ffn {moe['expert_intermediate_size']}"
        + ("" if moe["shared_expert_intermediate_size"] is None else f", shared ffn {moe['shared_expert_intermediate_size']}"))
    return (
        f"minitron: {params_before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters ({100 * after / params_before:.1f}%); "
        f"hidden {c.hidden_size}, {dense_ffn}heads {c.num_attention_heads}/{c.num_key_value_heads} kv, "
        f"head_dim {head_dim_of(c)}, layers {c.num_hidden_layers}{experts}"
    )
