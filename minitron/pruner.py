"""``minitron.prune``: calibrate importance, pick what to keep, return a smaller model."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import decoder_layers, get_adapter, head_dim_of, moe_sizes, sparse_layers
from .pruning.budget import choose_budget_target
from .data import load_text_blocks, resolve_seq_len
from .heap import trim_heap, trimmed_layers
from .importance.ablation import greedy_layer_removal
from .importance.collect import ImportanceConfig, ImportanceScores, collect_importance
from .models import resolve_tokenizer
from .offload import refuse_offloaded
from .ops.mapped import release_unreferenced_pages
from .pruning import Target, apply_plan, make_plan, random_plan
from .pruning.config import PruneConfig, config_from_legacy
from .pruning.params import budget_of, count_parameters
from .pruning.sizing import target_for_budget
from .validate import check_finite_scores, check_finite_weights

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
        # None (automatic) or False: only when the target prunes heads by their output norms
        head_output=bool(importance.head_output) or (head_metric == "output"
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


def check_prune_request(model: nn.Module, target: Target | None, params: float | None, config: PruneConfig,
                        scores: ImportanceScores | None = None) -> None:
    """Every check of a :func:`prune` call that needs no data and no forward pass (``prune`` runs it first).

    Args:
        model: the model to prune.
        target / params: what to reach (exactly one of them).
        config: the (already validated) options; its ``divisors`` are checked against ``target``.
        scores: precomputed statistics, checked against the model's shapes.
    Raises:
        ValueError: both or neither of ``target`` and ``params``, a budget on a mixture-of-experts model,
            a budget that prunes nothing or reads as an implausible count, a target the model cannot take,
            scores of another model, or a model with offloaded / ``meta`` weights.
    Example:
        >>> check_prune_request(model, None, 2.0, PruneConfig())  # raises: a count under 1% of the model
    """
    get_adapter(model)  # an unsupported family is named first
    refuse_offloaded(model, "minitron.prune")  # before any work: never a half-pruned model
    if target is not None and params is not None:
        raise ValueError("give either target=Target(...) or params=<budget>, not both")
    if target is None and params is None:
        raise ValueError("nothing to prune: pass target=minitron.Target(...) or params=<fraction or count>")
    if params is not None:  # a bad budget (or one on a MoE model) is refused before calibration, not after it
        budget_of(model, params)
    if scores is not None:  # scores of another model: named first, whatever the target
        scores.check_matches(model)
    if target is not None:
        target.validate(model.config, config.divisors)


def prune(
    model: nn.Module,
    calib_data: Any = None,
    target: Target | None = None,
    *,
    params: float | None = None,
    config: PruneConfig | None = None,
    tokenizer: Any = None,
    scores: ImportanceScores | None = None,
    save_scores: str | Path | None = None,
    inplace: bool = False,
    progress: bool = True,
    verbose: bool = True,
    **legacy: Any,
) -> nn.Module:
    """Prune a Hugging Face causal LM Minitron-style.

    Supported families (:mod:`minitron.adapters`): Llama, Mistral, Qwen2, Qwen3, Starcoder2, Gemma 2,
    Gemma 3 text, Phi-3, and the mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE.

    Args:
        model: a ``*ForCausalLM`` of a supported family.
        calib_data: calibration text (Dataset, list of strings, .txt/.jsonl path) or token ids;
            not needed when ``scores`` are given or ``config.method="random"``.
        target: the architecture to reach; ``None`` fields keep the model's value.
        params: instead of ``target``, a parameter budget (fraction <= 1 or absolute count; dense models).
            With calibration data the shape is measured (:func:`minitron.pruning.budget.choose_budget_target`:
            hidden/FFN trade-offs, the lowest calibration loss after pruning wins); without it
            (``scores`` only, or ``method="random"``) :func:`minitron.pruning.sizing.target_for_budget`
            scales hidden and FFN by the same factor.
        config: how to calibrate and rank (:class:`minitron.PruneConfig`; default ``PruneConfig()``).
        tokenizer: tokenizer for text data (default: loaded from the model's local path).
        scores: precomputed :class:`ImportanceScores` (one calibration, many targets; the defaults of
            :func:`minitron.collect_importance` hold what the default criteria need, except the
            layer-drop losses of ``depth_metric="ppl"``: ``ImportanceConfig(depth_ppl=True)``).
        save_scores: write the importance statistics this call calibrates to this safetensors file.
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
        **legacy: the keyword arguments ``prune`` took before :class:`PruneConfig` (``importance``,
            ``seq_len``, ``num_samples``, ``batch_agg``, ``depth_metric``, ``depth_mode``, ``depth_rounds``,
            ``head_metric``, ``norm_rescale``, ``head_residual``, ``budget_blocks``, ``method``, ``seed``,
            ``divisors``): still accepted, as overrides of the matching ``config`` field, with a
            DeprecationWarning.
    Returns:
        The pruned model, a standard model of the same class (``save_pretrained`` works).
    Raises:
        ValueError: bad target/budget/option (all checked before the first forward pass), ``seq_len``
            beyond ``max_position_embeddings``, NaN/inf in the weights or the importance statistics,
            token ids outside the vocabulary, a model with accelerate-offloaded (cpu/disk) or ``meta``
            weights (prune its checkpoint folder with :func:`minitron.prune_checkpoint` instead).

    Example:
        >>> small = minitron.prune(model, ["text ..."], minitron.Target(hidden_size=192, intermediate_size=512),
        ...                        tokenizer=tok, config=minitron.PruneConfig(num_samples=64))
        >>> small.save_pretrained("out/")
    """
    if legacy:
        warnings.warn(f"minitron.prune({', '.join(sorted(legacy))}=...): pass these as "
                      "config=minitron.PruneConfig(...) (batch_agg: PruneConfig(importance=ImportanceConfig("
                      "batch_agg=...))); the keywords still override config's fields",
                      DeprecationWarning, stacklevel=2)
    cfg = config_from_legacy(config, legacy)  # every option checked here, before any data is read
    check_prune_request(model, target, params, cfg, scores)
    adapter = get_adapter(model)
    check_finite_weights(model)
    # pages of the checkpoint file the loader read and converted (MoE experts) but no parameter maps
    release_unreferenced_pages([*model.parameters(), *model.buffers()])
    options = cfg.plan_options()
    iterative = cfg.depth_rounds > 1
    blocks = None
    if cfg.method == "activation" and calib_data is not None and (scores is None or target is None or iterative):
        seq_len = resolve_seq_len(calib_data, cfg.seq_len, [model])
        text_tokenizer = None if isinstance(calib_data, torch.Tensor) else resolve_tokenizer(model, tokenizer)
        blocks = load_text_blocks(calib_data, text_tokenizer, seq_len, cfg.num_samples,
                                  chat_template=cfg.chat_template)
    if target is None:
        if blocks is None:
            target = target_for_budget(model, params)
        else:  # measured: every candidate shape prunes hidden and FFN only, so no loss-based scores are needed
            # the C heap (glibc) keeps freed activations resident: trimmed before every layer's forward,
            # and once calibration is over, a pass leaves about one layer's freed activations behind
            # instead of ~0.1-0.2x the model (135M), the same on every run (heap.py)
            with trimmed_layers(decoder_layers(model, adapter)):
                if scores is None:  # Target(): hidden/FFN only, no loss-based or head-output scores
                    scores = _calibrate(model, blocks, loss_scores_for(cfg.importance, Target(), model.config,
                                                                       cfg.depth_metric, cfg.head_metric),
                                        save_scores, progress)
                trim_heap()
                # candidates are scored on the model itself (masked): no pruned copy raises the peak
                # scored 2 blocks per forward: the candidates' activations stay small next to the model
                # (calibration has just released its own), so the call's peak stays near the model's bytes
                target, _ = choose_budget_target(model, params, scores, blocks[:cfg.budget_blocks],
                                                 plan_options=options, batch_size=min(2, cfg.importance.batch_size))
        target.validate(model.config, cfg.divisors)

    if cfg.method == "random":
        plan = random_plan(model.config, target, cfg.seed)
    else:
        if scores is None:
            if blocks is None:
                raise ValueError("empty calibration data: pass calib_data=... (or precomputed scores=...)")
            # loss-based scores cost extra passes: computed only when this target prunes that axis
            # (a copy: the caller's config stays as given)
            # (iterative removal computes its own layer-drop losses)
            importance = loss_scores_for(cfg.importance, target, model.config,
                                         "bi" if iterative else cfg.depth_metric, cfg.head_metric)
            with trimmed_layers(decoder_layers(model, adapter)):
                scores = _calibrate(model, blocks, importance, save_scores, progress)
        check_finite_scores(scores)
        if iterative and target.resolved(model.config).num_hidden_layers < model.config.num_hidden_layers:
            scores = _iterative_depth_scores(model, scores, target, blocks, cfg.depth_rounds, cfg.importance,
                                             progress)
        plan = make_plan(scores, target, model.config, **options)

    before = count_parameters(model)
    trim_heap()  # the pruning step starts from the live memory only (in place it adds a few MiB to it)
    pruned = apply_plan(model, plan, inplace=inplace)
    logger.log(logging.INFO if verbose else logging.DEBUG, "%s", pruning_summary(before, pruned))
    return pruned


def _calibrate(model: nn.Module, blocks: torch.Tensor, importance: ImportanceConfig, save_scores: Any,
               progress: bool) -> ImportanceScores:
    """:func:`collect_importance` on ``blocks``, saved to ``save_scores`` when given."""
    scores = collect_importance(model, blocks, importance, progress=progress)
    if save_scores is not None:
        scores.save(save_scores)
        logger.info("importance statistics written to %s", save_scores)
    return scores


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
