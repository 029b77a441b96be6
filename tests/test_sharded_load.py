"""Sharded loading under torchrun (2 gloo processes): meta models, each rank reading only its own rows.

Checked against today's path (every rank loads both models whole, then ``fully_shard``): the same
training losses (also for an in-memory student beside a sharded teacher, and through the CLI), and a
per-rank peak RSS after loading lower by at least half the two models' bytes. Shapes are odd (vocabulary
515, FFN 3 * hidden + 1), so the last rank's FSDP shard is shorter than the first's.
"""

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
from transformers import LlamaConfig, LlamaForCausalLM

from minitron.distillation.sharded_load import check_meta_teacher_padding, materialise, meta_model, on_meta

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SCRIPT = textwrap.dedent('''
    import json, os, resource, sys, torch
    import torch.distributed as dist
    from minitron import load_model
    from minitron.distillation import distill, DistillConfig
    from minitron.distillation import distributed as D
    from minitron.distillation.sharded_load import meta_model

    def peak_kb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run(student_dir, teacher_dir, out, mode):
        torch.set_num_threads(1)
        peaks = {}  # of the first run of this process only (a peak never goes down)
        wrap = D.wrap

        def measured_wrap(*args):  # the peak up to the end of loading + sharding (training adds its own)
            wrapped = wrap(*args)
            peaks["load_peak_kb"] = peak_kb()
            return wrapped

        D.wrap = measured_wrap
        if mode == "sharded":
            student, teacher = meta_model(student_dir), meta_model(teacher_dir)
        elif mode == "mixed":  # a student that exists only in memory (e.g. pruned in this process)
            student, teacher = load_model(student_dir)[0], meta_model(teacher_dir)
        else:
            student, teacher = load_model(student_dir)[0], load_model(teacher_dir)[0]
        data = torch.randint(0, 512, (32, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)  # the projections of intermediate_layers are drawn in distill
        distill(student, teacher, data, eval_data=data[:4], config=DistillConfig(
            steps=3, seq_len=16, batch_size=4, lr=1e-3, warmup_steps=1, save_every=None, eval_every=None,
            intermediate_layers=[(1, 2)], output_dir=out, parallel="fsdp", progress=False, plot=False))
        rank = dist.get_rank() if dist.is_initialized() else 0
        with open(os.path.join(out, f"rss_{rank}.json"), "w") as f:
            json.dump({**peaks, "run_peak_kb": peak_kb()}, f)

    if __name__ == "__main__":
        for mode in sys.argv[4].split(","):  # one process runs each mode in turn (torchrun starts in seconds, not ms)
            run(sys.argv[1], sys.argv[2], os.path.join(sys.argv[3], mode), mode)
''')


def _llama(hidden: int, layers: int, seed: int, tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    # odd vocabulary and FFN: rows that do not split evenly over 2 ranks (FSDP pads the last shard)
    return LlamaForCausalLM(LlamaConfig(vocab_size=515, hidden_size=hidden, intermediate_size=3 * hidden + 1,
                                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                        max_position_embeddings=64, tie_word_embeddings=tie))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A ~100 MB fp32 teacher (untied) and a tied student, saved as safetensors folders."""
    root = tmp_path_factory.mktemp("models")
    _llama(640, 6, 0, tie=False).save_pretrained(root / "teacher")
    _llama(320, 3, 1, tie=True).save_pretrained(root / "student")
    return root / "student", root / "teacher"


def _torchrun(tmp: Path, student: Path, teacher: Path, mode: str) -> Path:
    """Run the comma-separated ``mode``s in one ``torchrun`` of 2 processes; their outputs are ``tmp/<mode>``."""
    script = tmp / "sharded_script.py"
    script.write_text(SCRIPT)
    out = tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(student), str(teacher), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / mode.split(",")[0]


def _losses(out: Path) -> torch.Tensor:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] if r["split"] == "train" else r["lm_loss"] for r in rows])


def _peak_rss(out: Path, key: str) -> list[int]:
    return [json.loads((out / f"rss_{r}.json").read_text())[key] * 1024 for r in range(2)]


@pytest.fixture(scope="module")
def full(folders, tmp_path_factory):
    """Today's path: every rank loads both models whole, then fully_shard."""
    return _torchrun(tmp_path_factory.mktemp("full"), *folders, "full")


def test_sharded_loading_matches_todays_path_with_less_memory(folders, full, tmp_path):
    student, teacher = folders
    model_bytes = sum(f.stat().st_size for d in folders for f in d.glob("*.safetensors"))
    sharded = _torchrun(tmp_path, student, teacher, "sharded,mixed")  # peaks of the sharded run (first)
    # the same run: train losses and eval losses (before and after) agree to fp32 rounding
    torch.testing.assert_close(_losses(sharded), _losses(full), rtol=1e-4, atol=1e-5)
    a, b = load_file(full / "final"), load_file(sharded / "final")
    assert a.keys() == b.keys()
    for k in a:  # the same trained student (Adam on identical gradients)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    emb = b["model.embed_tokens.weight"]  # the tied embedding stayed one tensor through training
    assert torch.equal(b.get("lm_head.weight", emb), emb)
    rss_full, rss_sharded = _peak_rss(full, "load_peak_kb"), _peak_rss(sharded, "load_peak_kb")
    print(f"\npeak RSS per rank after loading (MB): full {[r >> 20 for r in rss_full]}, sharded "
          f"{[r >> 20 for r in rss_sharded]}; whole run: full {[r >> 20 for r in _peak_rss(full, 'run_peak_kb')]}, "
          f"sharded {[r >> 20 for r in _peak_rss(sharded, 'run_peak_kb')]}; models {model_bytes >> 20} MB")
    # today each rank holds both models whole (and its shards beside them while fully_shard copies them out);
    # sharded, half of them at most: at least half the models' bytes less per rank
    for f, s in zip(rss_full, rss_sharded):
        assert f - s > model_bytes / 2, (rss_full, rss_sharded, model_bytes)


    # a student that exists only in memory, beside a sharded teacher: the same run too
    torch.testing.assert_close(_losses(tmp_path / "mixed"), _losses(full), rtol=1e-4, atol=1e-5)


def load_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as _load

    return _load(str(folder / "model.safetensors"))


def test_meta_model_loads_whole_in_one_process(folders):
    student, _ = folders
    model = meta_model(student)
    assert on_meta(model) and model.model.rotary_emb.inv_freq.device.type == "cpu"  # buffers real at once
    materialise(model, torch.device("cpu"))
    ref = LlamaForCausalLM.from_pretrained(student)
    assert not on_meta(model) and model.lm_head.weight is model.model.embed_tokens.weight
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    x = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=0)


def test_meta_model_refuses_gguf_and_nan(folders, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="convert it first"):
        meta_model(gguf)
    bad = _llama(64, 1, 0, tie=False)
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    bad.save_pretrained(tmp_path / "bad")
    model = meta_model(tmp_path / "bad")
    with pytest.raises(ValueError, match="up_proj.weight .* NaN/inf"):
        materialise(model, torch.device("cpu"))


def test_meta_teacher_with_nonzero_extra_rows_is_refused(tmp_path):
    teacher = _llama(64, 1, 0, tie=False)
    teacher.save_pretrained(tmp_path / "t")
    student = _llama(64, 1, 1, tie=False)
    student.resize_token_embeddings(500)
    with pytest.raises(ValueError, match="extra rows are not all zero"):
        check_meta_teacher_padding(student, meta_model(tmp_path / "t"))
    with torch.no_grad():
        teacher.lm_head.weight[500:] = 0
    teacher.save_pretrained(tmp_path / "t0")
    check_meta_teacher_padding(student, meta_model(tmp_path / "t0"))  # zero rows: padding, accepted
    tied = _llama(64, 1, 0, tie=True)  # the rows are read from the embedding (no lm_head.weight in the file)
    tied.save_pretrained(tmp_path / "tied")
    with pytest.raises(ValueError, match="extra rows are not all zero"):
        check_meta_teacher_padding(student, meta_model(tmp_path / "tied"))


def test_cli_fsdp_under_torchrun_loads_sharded(folders, tmp_path):
    """``torchrun -m minitron.cli.distill --parallel fsdp``: meta models, perplexities from the run's evaluations."""
    from minitron import load_model, perplexity

    student, teacher = folders
    data, held = tmp_path / "train.pt", tmp_path / "eval.pt"
    torch.save(torch.randint(0, 512, (16, 16), generator=torch.Generator().manual_seed(0)), data)
    torch.save(torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1)), held)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "minitron.cli.distill", "--student", str(student), "--teacher", str(teacher), "--data", str(data),
           "--eval-data", str(held), "--steps", "1", "--batch-size", "4", "--parallel", "fsdp",
           "--output-dir", str(tmp_path / "run"), "--no-progress", "--no-plot"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('{"teacher"')))
    blocks = torch.load(held)
    # the run's own evaluation (sharded models) equals minitron.perplexity of the models loaded whole
    assert report["teacher_ppl"] == pytest.approx(perplexity(load_model(teacher)[0], blocks, 4), rel=1e-4)
    assert report["student_ppl_before"] == pytest.approx(perplexity(load_model(student)[0], blocks, 4), rel=1e-4)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
