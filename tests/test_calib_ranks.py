"""Calibration split over 2 gloo processes (``torchrun``) equals the single-process statistics (issue #22).

The same script runs ``collect_importance`` on a loaded model and ``prune_checkpoint`` (layer-streamed) on
its checkpoint under ``torch.distributed.run --nproc_per_node 2``: each rank calibrates half of the blocks
and the sums are all-reduced; rank 0 alone writes the pruned checkpoint and the scores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import minitron
from tests.helpers import make_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SCRIPT = textwrap.dedent('''
    import sys, torch
    import minitron

    def run(src, out, scores_path, collect_path):
        torch.set_num_threads(1)
        ids = torch.randint(0, 101, (10, 16), generator=torch.Generator().manual_seed(1))
        target = minitron.Target(hidden_size=36, intermediate_size=40, num_attention_heads=4, num_hidden_layers=3)
        minitron.prune_checkpoint(src, out, ids, target, importance=minitron.ImportanceConfig(batch_size=2),
                                  depth_metric="bi", save_scores=scores_path, progress=False)
        from transformers import AutoModelForCausalLM
        import torch.distributed as dist
        config = minitron.ImportanceConfig(batch_size=2, head_output=True, depth_ppl=True)
        scores = minitron.collect_importance(AutoModelForCausalLM.from_pretrained(src), ids, config, progress=False)
        rank = dist.get_rank() if dist.is_initialized() else 0
        scores.save(f"{collect_path}.{rank}")

    if __name__ == "__main__":
        run(*sys.argv[1:5])
''')
IDS = torch.randint(0, 101, (10, 16), generator=torch.Generator().manual_seed(1))


def assert_close_scores(a: minitron.ImportanceScores, b: minitron.ImportanceScores) -> None:
    """Equal up to the order of the floating-point additions; counts exactly."""
    assert a.counts == b.counts and a.bi_count == b.bi_count and a.sums.keys() == b.sums.keys()
    for site in a.sums:
        for x, y in zip(a.sums[site], b.sums[site]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.bi_cos_sum, b.bi_cos_sum, rtol=1e-5, atol=1e-5)
    for site in a.norm_ms:
        torch.testing.assert_close(a.norm_ms[site], b.norm_ms[site], rtol=1e-5, atol=1e-6)
    if a.ppl_loss is not None:
        torch.testing.assert_close(a.ppl_loss, b.ppl_loss)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    src = tmp_path / "src"
    make_model("qwen2").save_pretrained(src, max_shard_size="100KB")
    script = tmp_path / "calib_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(src), str(tmp_path / "dist"), str(tmp_path / "dist.safetensors"), str(tmp_path / "collect")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    ns: dict = {"__name__": "calib_script"}
    exec(compile(SCRIPT, "calib_script", "exec"), ns)
    n = torch.get_num_threads()
    try:
        ns["run"](str(src), str(tmp_path / "single"), str(tmp_path / "single.safetensors"), str(tmp_path / "one"))
    finally:
        torch.set_num_threads(n)
    # layer-streamed, 2 ranks x 5 blocks == 1 process x 10 blocks
    assert_close_scores(minitron.ImportanceScores.load(tmp_path / "dist.safetensors"),
                        minitron.ImportanceScores.load(tmp_path / "single.safetensors"))
    # whole-model calibration: both ranks hold the summed statistics
    one = minitron.ImportanceScores.load(tmp_path / "one.0")
    for rank in (0, 1):
        assert_close_scores(minitron.ImportanceScores.load(tmp_path / f"collect.{rank}"), one)
    # the same plan: the checkpoint rank 0 wrote equals the single-process one (up to norm-rescale rounding)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "dist").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
