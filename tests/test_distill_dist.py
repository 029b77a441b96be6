"""Distributed distillation on CPU: 2 processes, gloo, via ``torchrun`` (DDP and FSDP2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minitron.distillation.checkpoint import latest_checkpoint, load_student_state

SCRIPT = textwrap.dedent('''
    import os, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from minitron.distillation import distill, DistillConfig

    def tiny(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64))

    def run(out, parallel, stop_at=0):
        torch.set_num_threads(1)
        teacher, student = tiny(32, 2, 0), tiny(16, 2, 1)
        data = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))

        def stop(step, metrics, student):
            if step == stop_at:
                raise SystemExit(3)

        distill(student, teacher, data, eval_data=data[:8], config=DistillConfig(
            steps=4, seq_len=16, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=1, save_every=2, eval_every=2,
            intermediate_layers=[(1, 1)], output_dir=out, parallel=parallel, progress=False, plot=False,
            mixed_precision="fp32"),  # fp32: ranks vs one process are compared at fp32 tolerances
            callbacks=[stop] if stop_at else None)

    if __name__ == "__main__":
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
''')

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _torchrun(tmp: Path, out: Path, parallel: str, stop_at: int = 0) -> subprocess.CompletedProcess:
    script = tmp / "distill_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out), parallel, str(stop_at)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _train_losses(out: Path) -> torch.Tensor:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return torch.tensor([r["loss"] for r in map(json.loads, f) if r["split"] == "train"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same run in one process (the reference)."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("single")
    ns: dict = {"__name__": "distill_script"}
    exec(compile(SCRIPT, "distill_script", "exec"), ns)
    ns["run"](str(out), "none")
    torch.set_num_threads(n)
    return out


def test_ddp_two_processes_match_single_process(single, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(tmp_path, out, "ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = load_student_state(single / "final"), load_student_state(out / "final")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    ckpt = load_student_state(latest_checkpoint(out) / "student")
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in ref.items()}
    # each rank takes a disjoint half of the same global batch: the trajectory is the single-process one
    assert torch.allclose(_train_losses(out), _train_losses(single), rtol=1e-4)


def test_fsdp_two_processes_interrupt_and_resume(single, tmp_path):
    out = tmp_path / "fsdp"
    proc = _torchrun(tmp_path, out, "fsdp", stop_at=3)  # dies after step 3; checkpoint at step 2
    assert proc.returncode != 0 and latest_checkpoint(out).name == "step_000002"
    proc = _torchrun(tmp_path, out, "fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ref, got = load_student_state(single / "final"), load_student_state(out / "final")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    # resumed across processes, the loss trajectory is still the single-process one (weights agree only to
    # ~lr: Adam turns float-rounding differences of near-zero gradients into lr-sized updates)
    assert torch.allclose(_train_losses(out), _train_losses(single), rtol=1e-4)
