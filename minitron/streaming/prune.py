"""``minitron.prune_checkpoint``: prune a checkpoint folder larger than memory, one layer / row chunk at a time.

Calibration streams the decoder layers (:mod:`.calibrate`), the plan is the in-memory path's
(:func:`minitron.make_plan` / :func:`minitron.random_plan`), and the surgery streams row chunks
into safetensors shards (:mod:`.write`), written into a temp folder and moved into place with the
output-folder rules of ``minitron prune`` (:mod:`minitron.outputs`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data import is_token_file, load_text_blocks, resolve_seq_len
from ..importance.collect import ImportanceConfig, ImportanceScores, is_importance_file
from ..importance.ranks import world
from ..outputs import check_output_dir, check_output_file, write_output_dir
from ..pruning import (DEFAULT_DEPTH_METRIC, DEFAULT_HEAD_METRIC, DEFAULT_HEAD_RESIDUAL, DEFAULT_NORM_RESCALE, Target,
                       make_plan, pruned_config, random_plan)
from ..pruning.params import count_parameters
from ..pruning.sizing import target_for_budget
from ..validate import check_count, check_finite_scores
from .calibrate import streamed_importance
from .checkpoint import CheckpointReader, skeleton
from .depth import layer_drop_bytes, streamed_layer_drop_losses
from .write import plan_tensors, write_shards

logger = logging.getLogger(__name__)

__all__ = ["prune_checkpoint"]

# files of a checkpoint folder copied as they are (tokenizer, generation settings); config.json is rewritten
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json")


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={value!r}: use float32, bfloat16 or float16 (or None: the checkpoint's)")
    return getattr(torch, value)


def _streamable_metrics(scores: ImportanceScores | None, target: Target, config, depth_metric: str,
                        head_metric: str, ppl_bytes: int | None, ppl_memory: int) -> tuple[str, str]:
    """The depth / head criteria the streamed path serves; what it cannot falls back with a warning.

    ``ppl_bytes``: the extra memory of the streamed layer-drop losses (None: no calibration data).
    """
    t = target.resolved(config)
    if depth_metric == "ppl" and t.num_hidden_layers < config.num_hidden_layers and \
            (scores is None or scores.ppl_loss is None) and (ppl_bytes is None or ppl_bytes > ppl_memory):
        why = "needs calibration data" if ppl_bytes is None else (
            f"would hold {ppl_bytes / 2**30:.2f} GiB (every layer-dropped variant's hidden states and the lm_head) "
            f"> ppl_memory={ppl_memory / 2**30:.2f} GiB; lower importance.ppl_max_blocks or raise ppl_memory")
        logger.warning("minitron: depth_metric='ppl' (LM loss with each layer dropped) %s; the streamed prune ranks "
                       "layers by Block Importance (depth_metric='bi') instead", why)
        depth_metric = "bi"
    if head_metric == "loss" and t.num_attention_heads < config.num_attention_heads and \
            (scores is None or scores.head_loss is None):
        logger.warning("minitron: head_metric='loss' needs a pass per head over the whole model; the streamed prune "
                       "ranks heads by their output contribution (head_metric='output') instead")
        head_metric = "output"
    return depth_metric, head_metric


def _join_ranks(device: str | torch.device) -> tuple[int, int, torch.device]:
    """``(rank, world, device)``; under ``torchrun`` the process group is initialised here if needed
    (gloo on CPU, NCCL on CUDA) and ``cuda`` means this rank's ``LOCAL_RANK`` GPU."""
    import torch.distributed as dist

    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, size = world()
    if device.type == "cuda" and device.index is None and size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return rank, size, device


def _on_rank0(size: int, rank: int, fn) -> None:
    """Run ``fn`` on rank 0 only; every rank raises if it failed (no rank waits forever)."""
    error, original = None, None
    if rank == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error, original = f"{type(e).__name__}: {e}", e
    if size > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if original is not None:
        raise original
    if error is not None:
        raise RuntimeError(f"rank 0 failed to write the output: {error}")


def prune_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
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
    head_metric: str = DEFAULT_HEAD_METRIC,
    norm_rescale: bool = DEFAULT_NORM_RESCALE,
    head_residual: bool = DEFAULT_HEAD_RESIDUAL,
    method: str = "activation",
    seed: int = 0,
    divisors: dict[str, int] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    max_shard_size: int = 5 << 30,
    ppl_memory: int = 4 << 30,
    save_scores: str | os.PathLike | None = None,
    chat_template: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prune the checkpoint folder ``src_dir`` into ``dst_dir`` without loading the model.

    Same plan as :func:`minitron.prune` on the loaded model (same statistics, same keep-indices,
    same weight edits), but only one decoder layer (calibration) or one row chunk (surgery) is in
    memory at a time: peak memory is about one layer's weights plus the cached hidden states of the
    calibration blocks (:func:`minitron.streaming.calibrate.expected_peak_bytes`), whatever the
    model's size. Dense families (Llama, Mistral, Qwen2/3, Starcoder2, Gemma 2/3, Phi-3) with
    safetensors weights; mixture-of-experts checkpoints are refused (transformers fuses their
    experts at load time).

    The layer-drop loss (``depth_metric="ppl"``, the default) streams too, each layer read once
    (:mod:`minitron.streaming.depth`), when its extra memory (a copy of the ``ppl_max_blocks``
    hidden states per layer, plus the ``lm_head``) stays under ``ppl_memory``; otherwise it falls back
    to Block Importance (``bi``) with a warning. The head-drop loss (``head_metric="loss"``) falls
    back to ``output``. Given ``scores`` holding them are used as they are. A ``params`` budget picks the shape by
    :func:`minitron.pruning.sizing.target_for_budget` (hidden and FFN scaled by one factor), not by the
    calibration loss of candidate shapes (which needs the model in memory).

    Args:
        src_dir: checkpoint folder (``config.json`` + safetensors shards), left untouched.
        dst_dir: output folder: new, empty, a previous ``minitron prune`` output, or any folder with
            ``overwrite`` (minitron's files replace same-named ones, nothing else is deleted).
        calib_data: calibration text or token ids, as for :func:`minitron.prune`.
        target: the architecture to reach (or ``params``).
        params: parameter budget (fraction <= 1 or count), see above.
        tokenizer: tokenizer of text data (default: the checkpoint folder's); saved to ``dst_dir``
            when given, else the folder's tokenizer files are copied.
        scores: precomputed statistics (e.g. ``collect_importance`` on an offloaded model).
        importance: calibration options (``batch_size``, aggregation, ``sink_tokens``).
        seq_len / num_samples / batch_agg / depth_metric / depth_mode / head_metric / norm_rescale /
            head_residual / method / seed / divisors: as for :func:`minitron.prune`.
        dtype: calibration compute dtype (default: the checkpoint's ``dtype``); the written weights keep
            their stored dtype.
        device: where layers run during calibration (``cpu``, ``cuda``).
        max_shard_size: bytes of tensor data per output shard.
        ppl_memory: the most bytes the streamed layer-drop losses may hold (else ``bi``, see above).
        save_scores: also write the importance statistics to this safetensors file.
        chat_template: render calibration text with the tokenizer's chat template.
        overwrite: see ``dst_dir``.
        progress: tqdm bars.
    Returns:
        ``Path(dst_dir)``, loadable with ``AutoModelForCausalLM.from_pretrained``. Under ``torchrun``
        every rank calibrates its share of the blocks (:mod:`minitron.importance.ranks`), all get the
        same statistics and plan, and rank 0 alone writes ``dst_dir`` / ``save_scores``.
    Raises:
        ValueError: bad arguments, unsupported / mixture-of-experts / non-safetensors checkpoints, NaN/inf
            weights, an unsafe output folder (nothing is written then).

    Example:
        >>> minitron.prune_checkpoint("Llama-3.1-8B/", "out/llama-4b", "calib.jsonl",
        ...                           minitron.Target(hidden_size=3072, intermediate_size=9216))
    """
    if method not in ("activation", "random"):
        raise ValueError(f"unknown method={method!r}; allowed values: activation, random")
    if (target is None) == (params is None):
        raise ValueError("give either target=minitron.Target(...) or params=<fraction or count> (exactly one)")
    check_count("num_samples", num_samples)
    rank, size, device = _join_ranks(device)
    src = Path(src_dir)
    inputs = [src, calib_data if isinstance(calib_data, (str, os.PathLike)) else None]
    dst = check_output_dir(dst_dir, "prune", inputs=inputs, overwrite=overwrite, flag="dst_dir",
                           fix="overwrite=True")  # before any long work
    if save_scores is not None:
        check_output_file(save_scores, inputs=inputs, outside_of=[("dst_dir", dst)], overwrite=overwrite,
                          is_ours=is_importance_file, flag="save_scores", fix="overwrite=True")
    reader = CheckpointReader(src)
    model = skeleton(src, _dtype(dtype), reader)  # every parameter on meta
    config = model.config
    if scores is not None:
        scores.check_matches(model)
    if target is None:
        target = target_for_budget(model, params)
        logger.warning("minitron: params=%s with the streamed prune: shape %s scaled by one factor "
                       "(minitron.pruning.sizing.target_for_budget), not measured by calibration loss", params, target)
    target.validate(config, divisors)

    if method == "random":
        plan = random_plan(config, target, seed)
    else:
        blocks, ppl_bytes = None, None
        base_config = importance or ImportanceConfig()
        if scores is None and calib_data is not None:
            seq_len = resolve_seq_len(calib_data, seq_len, [model])
            text_tokenizer = None
            if not isinstance(calib_data, torch.Tensor) and not is_token_file(calib_data):
                from ..models import resolve_tokenizer

                text_tokenizer = resolve_tokenizer(model, tokenizer)  # the checkpoint folder's by default
            blocks = load_text_blocks(calib_data, text_tokenizer, seq_len, num_samples, chat_template=chat_template)
            itemsize = next(model.parameters()).dtype.itemsize
            ppl_bytes = layer_drop_bytes(config, min(base_config.ppl_max_blocks, blocks.shape[0]), blocks.shape[1],
                                         itemsize, itemsize)
        depth_metric, head_metric = _streamable_metrics(scores, target, config, depth_metric, head_metric,
                                                        ppl_bytes, ppl_memory)
        if scores is None:
            if blocks is None:
                raise ValueError("empty calibration data: pass calib_data=... (or precomputed scores=...)")
            from ..pruner import loss_scores_for

            config_i = loss_scores_for(base_config, target, config, depth_metric, head_metric)
            stream_ppl = config_i.depth_ppl
            config_i = dataclasses.replace(config_i, depth_ppl=False, head_loss=False)
            if batch_agg is not None:
                config_i = dataclasses.replace(config_i, batch_agg=batch_agg)
            scores = streamed_importance(reader, model, blocks, config_i, device=device,
                                         progress=progress and rank == 0)
            if stream_ppl:  # each layer read once more, every layer-dropped variant carried along
                scores.base_loss, scores.ppl_loss = streamed_layer_drop_losses(
                    reader, model, blocks[: config_i.ppl_max_blocks], config_i.batch_size, device,
                    progress=progress and rank == 0)
            if save_scores is not None:
                _on_rank0(size, rank, lambda: scores.save(save_scores))
        check_finite_scores(scores)
        plan = make_plan(scores, target, config, batch_agg=batch_agg or (importance.batch_agg if importance else None),
                         depth_metric=depth_metric, depth_mode=depth_mode, head_metric=head_metric,
                         norm_rescale=norm_rescale, head_residual=head_residual)

    new_config = pruned_config(config, plan)
    jobs = plan_tensors(reader, model, plan)
    calibration_bytes = reader.bytes_read

    def write(tmp: Path) -> None:
        write_shards(reader, model, jobs, tmp, max_shard_size)
        new_config.save_pretrained(tmp)
        for name in COPIED_FILES:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(src / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    _on_rank0(size, rank, lambda: write_output_dir(dst, "prune", write, overwrite=overwrite))
    before = count_parameters(model)
    after = sum(j.nbytes // j.dtype.itemsize for j in jobs)
    logger.info("minitron: %.2fM -> %.2fM parameters (%d -> %d layers) streamed from %s to %s; read %.1f MB "
                "(calibration %.1f MB)", before / 1e6, after / 1e6, config.num_hidden_layers,
                new_config.num_hidden_layers, src, dst,
                reader.bytes_read / 1e6, calibration_bytes / 1e6)
    return dst
