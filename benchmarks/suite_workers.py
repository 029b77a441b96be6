"""The subprocess workers of ``run_all.py`` (``python benchmarks/run_all.py --worker NAME --spec JSON``).

Each returns one JSON-able dict: the prune, calibration and distillation rows of the suite, on the
built-in model or a real checkpoint loaded with :func:`minitron.models.load_model`.
"""

from __future__ import annotations

import time

from common import base_mem, peak_mb, reset_hwm, status_kb, sync


def worker_prune(device: str, inplace: bool, n_blocks: int, seq_len: int, model_name: str = "builtin-tiny") -> dict:
    """Calibrate the model on ``n_blocks`` x ``seq_len`` tokens and prune it to 50%."""
    import minitron
    from minitron.models import load_model
    from minitron.data import builtin_text

    model, tok = load_model(model_name, device=device)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    blocks = minitron.load_text_blocks([builtin_text("train")], tok, seq_len, n_blocks)
    base = base_mem(device)
    t0 = time.perf_counter()
    scores = minitron.collect_importance(model, blocks, minitron.ImportanceConfig(batch_size=8), progress=False)
    sync(device)
    calib_peak = peak_mb(device, base)
    # the prune step alone: CUDA peak stats / the kernel's VmHWM counter reset right before it
    base = base_mem(device)
    hwm_reset = device == "cuda" or reset_hwm()
    rss_before = status_kb("VmRSS") / 1024
    t1 = time.perf_counter()
    pruned = minitron.prune(model, params=0.5, scores=scores, inplace=inplace, verbose=False)
    sync(device)
    t2 = time.perf_counter()
    prune_peak = peak_mb(device, base) if device == "cuda" else status_kb("VmHWM") / 1024 - rss_before
    return {"calib_s": t1 - t0, "prune_s": t2 - t1, "calib_peak_mb": calib_peak, "peak_mb": prune_peak,
            "hwm_reset": hwm_reset, "params": minitron.count_parameters(pruned), "model_mb": model_mb}


def worker_calib(device: str, n_batches: int, batch: int, seq_len: int, model_name: str = "builtin-tiny") -> dict:
    """Tokens/s of the importance-hooked calibration pass vs a plain decoder pass, alternated per batch."""
    import statistics

    import torch

    import minitron
    from minitron.data import builtin_text
    from minitron.models import load_model

    model, tok = load_model(model_name, device=device)
    blocks = minitron.load_text_blocks([builtin_text("train")], tok, seq_len, n_batches * batch).to(device)
    cfg = minitron.ImportanceConfig(batch_size=batch)
    decoder = model.get_decoder()
    plain, hooked = [], []
    with torch.no_grad():
        decoder(input_ids=blocks[:batch], use_cache=False)  # warmup
        for i in range(n_batches):
            x = blocks[i * batch : (i + 1) * batch]
            for kind in (("plain", "hooked") if i % 2 == 0 else ("hooked", "plain")):
                sync(device)
                t0 = time.perf_counter()
                if kind == "plain":
                    decoder(input_ids=x, use_cache=False)
                else:
                    minitron.collect_importance(model, x, cfg, progress=False)
                sync(device)
                (plain if kind == "plain" else hooked).append(time.perf_counter() - t0)
    tokens = batch * seq_len
    p, h = statistics.median(plain), statistics.median(hooked)
    return {"plain_tok_s": tokens / p, "hooked_tok_s": tokens / h, "overhead": h / p,
            "pairs": [[round(a, 3), round(b, 3)] for a, b in zip(plain, hooked)]}


def worker_distill(device: str, loss_impl: str, batch: int, seq_len: int, steps: int,
                   model_name: str = "builtin-tiny") -> dict:
    """Distillation steps/s of a 50% random prune of the model (the teacher); the first step is warmup."""
    import tempfile

    import minitron
    from minitron.models import load_model
    from minitron.data import builtin_text

    teacher, tok = load_model(model_name, device=device)
    blocks = minitron.load_text_blocks([builtin_text("train")], tok, seq_len)
    if model_name == "builtin-tiny":
        target = minitron.Target(hidden_size=160, intermediate_size=496)
    else:
        target = minitron.target_for_budget(teacher, 0.5)
    student = minitron.prune(teacher, target=target, method="random", verbose=False)
    stamps: list[float] = []

    def cb(step, metrics, model) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    base = base_mem(device)
    with tempfile.TemporaryDirectory() as out:
        cfg = minitron.DistillConfig(steps=steps, seq_len=seq_len, batch_size=batch, warmup_steps=1, save_every=None,
                                     eval_every=None, plot=False, progress=False, output_dir=out, resume=False,
                                     loss_impl=loss_impl)
        minitron.distill(student, teacher, blocks, config=cfg, callbacks=[cb])
    timed = len(stamps) - 1
    secs = stamps[-1] - stamps[0]
    return {"tok_s": batch * seq_len * timed / secs, "step_ms": 1e3 * secs / timed, "peak_mb": peak_mb(device, base)}


WORKERS = {"prune": worker_prune, "distill": worker_distill, "calib": worker_calib}
