"""Distillation runs: no code from the run folder, no clobbered checkpoints, no silent wrong resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from minitron.cli import main
from minitron.distillation import DistillConfig, distill
from minitron.distillation.checkpoint import LATEST, TRAINER_STATE, last_good_checkpoint, latest_checkpoint
from minitron.distillation.metrics import read_rows
from minitron.owned import seal
from minitron.runlock import OutputInUseError, acquire
from tests.helpers import T, V, quick_cfg, rows, small_student, tiny


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def strict_json(line: str) -> dict:
    def refuse(token: str):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=refuse)


class _Stop(Exception):
    pass


def stop_at(n: int):
    def cb(step, metrics, student):
        if step == n:
            raise _Stop

    return cb


class Payload:
    """Unpickling this creates a file: proof that loading ran code from the run folder."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


# ---- run files never collide with a checkpoint; the run directory is checked -------------------------


def test_output_dir_is_the_students_folder(teacher_and_data, tmp_path, capsys):
    teacher, train, _ = teacher_and_data
    small_student().save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save(train[:32], tmp_path / "ids.pt")
    config = (tmp_path / "student" / "config.json").read_bytes()
    base = ["distill", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--data", str(tmp_path / "ids.pt"), "--steps", "1", "--seq-len", str(T), "--batch-size", "4", "--no-progress",
            "--no-plot"]
    assert main([*base, "--output-dir", str(tmp_path / "student")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "student" / "run")]) == 2
    assert (tmp_path / "student" / "config.json").read_bytes() == config
    LlamaForCausalLM.from_pretrained(tmp_path / "student")  # still loads

    # a run's own files never use Hugging Face names
    assert main([*base, "--output-dir", str(tmp_path / "run")]) == 0
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert "config.json" not in names and "minitron_run.json" in names

    # a folder holding someone's checkpoint is refused; --overwrite adds the run without touching it
    other = tmp_path / "other"
    small_student(seed=3).save_pretrained(other)
    before = (other / "model.safetensors").read_bytes()
    assert main([*base, "--output-dir", str(other)]) == 2
    assert "Hugging Face checkpoint" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(other), "--overwrite"]) == 0
    assert (other / "model.safetensors").read_bytes() == before and (other / "final" / "model.safetensors").is_file()


def test_python_api_refuses_a_foreign_non_empty_dir(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="not empty and was not written by `minitron distill`.*overwrite=True"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=1))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


# ---- metrics.jsonl ---------------------------------------------------------------------------------


def test_metrics_survive_a_partial_line_and_are_strict_json(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    kw = dict(steps=6, save_every=2, max_grad_norm=None)  # no clipping: grad_norm is not measured
    with pytest.raises(_Stop):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, **kw), callbacks=[stop_at(3)])
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"split": "train", "step": 4, "lo')  # kill -9 in the middle of a row
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, **kw))
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [strict_json(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_non_finite_metrics_are_valid_json(tmp_path):
    from minitron.distillation.metrics import append_row, as_float

    path = tmp_path / "m.jsonl"
    append_row(path, {"step": 1, "loss": float("nan"), "ppl": float("inf"), "x": float("-inf"), "ok": 1.5})
    row = strict_json(path.read_text(encoding="utf-8"))
    assert row == {"step": 1, "loss": "nan", "ppl": "inf", "x": "-inf", "ok": 1.5}
    assert as_float(row["ppl"]) == float("inf")


def test_stale_temp_dirs_of_the_run_are_cleaned(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=1))
    ckpts = tmp_path / "checkpoints"
    leftovers = [ckpts / ".minitron-tmp-step_000009-4242", ckpts / ".minitron-old-step_000001-4242",
                 tmp_path / ".minitron-tmp-final-4242"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"0" * 4096)  # a full-size interrupted write
    (tmp_path / ".latest.tmp-4242").write_text("step_000009")
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=2))
    assert not any(d.exists() for d in leftovers) and not (tmp_path / ".latest.tmp-4242").exists()


# ---- no code from the run folder ----------------------------------------------------------------------


def test_trainer_state_never_runs_code_and_falls_back(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    cfg = dict(steps=2, save_every=1)
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, **cfg))
    pwned = tmp_path.parent / f"{tmp_path.name}-PWNED"
    torch.save({"step": Payload(str(pwned))}, tmp_path / "checkpoints" / "step_000002" / TRAINER_STATE)
    seen = []
    with pytest.warns(UserWarning, match="step_000002/trainer_state.pt cannot be loaded safely.*older checkpoint"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=3, save_every=1),
                callbacks=[lambda s, m, st: seen.append(s)])
    assert not pwned.exists()
    assert seen == [2, 3]  # resumed from step 1, the newest checkpoint that loads


def test_latest_pointer_must_stay_inside_the_run(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    run, evil = tmp_path / "run", tmp_path / "evil"
    distill(small_student(), teacher, train, config=quick_cfg(run, steps=1))
    (run / "checkpoints" / "step_000001").rename(evil)  # a complete checkpoint outside the run...
    pwned = tmp_path / "PWNED"
    torch.save({"step": Payload(str(pwned))}, evil / TRAINER_STATE)
    for pointer in (str(evil), "../../evil", "step_000001/../../../evil"):
        (run / LATEST).write_text(pointer)
        with pytest.raises(ValueError, match="holds latest, which minitron did not write"):  # a hand-edited pointer
            distill(small_student(), teacher, train, config=quick_cfg(run, steps=2))
        with pytest.raises(ValueError, match="not a checkpoint inside"):  # accepted with overwrite, then checked
            distill(small_student(), teacher, train, config=quick_cfg(run, steps=2, overwrite=True))
    assert not pwned.exists()


# ---- corrupt checkpoints and resume mismatches -------------------------------------------------------


def test_truncated_weights_fall_back_or_are_named(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=2, save_every=1))
    weights = tmp_path / "checkpoints" / "step_000002" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    seen = []
    with pytest.warns(UserWarning, match="model.safetensors is corrupt or truncated"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=3, save_every=1),
                callbacks=[lambda s, m, st: seen.append(s)])
    assert seen == [2, 3]

    one = tmp_path / "one"
    distill(small_student(), teacher, train, config=quick_cfg(one, steps=1))
    (one / "checkpoints" / "step_000001" / TRAINER_STATE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"trainer_state.pt cannot be loaded safely.*resume=False"):
        distill(small_student(), teacher, train, config=quick_cfg(one, steps=2))


def test_resume_mismatches_are_clear_errors(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=4, save_every=2))
    final = (tmp_path / "final" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="at step 4, past steps=2"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=2))
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == final
    with pytest.raises(ValueError, match="another shape"):
        distill(tiny(hidden=24, layers=1, heads=2, kv=1, inter=32, seed=1), teacher, train,
                config=quick_cfg(tmp_path, steps=6))
    with pytest.raises(ValueError, match="holds a different distillation run.*lr is 0.01 there but 0.02 here"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=6, lr=2e-2))
    with pytest.raises(ValueError, match="training data has 256 blocks there but 128 here"):
        distill(small_student(), teacher, train[:128], config=quick_cfg(tmp_path, steps=6))

    weights = latest_checkpoint(tmp_path) / "student" / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    seal(weights.parents[1], "checkpoint")  # as if saved so: a checkpoint of another student, not a corrupted one
    with pytest.raises(ValueError, match=r"lacks 1 student tensor\(s\) \(model.layers.0.mlp.up_proj.weight\)"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=6))

    # an explicit fresh start discards the run (its own files only)
    (tmp_path / "notes.txt").write_text("keep")
    distill(small_student(), teacher, train[:128], config=quick_cfg(tmp_path, steps=1, resume=False))
    assert [r["step"] for r in rows(tmp_path, "train")] == [1] and (tmp_path / "notes.txt").read_text() == "keep"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def test_second_python_call_does_not_resume_another_run(teacher_and_data, tmp_path, monkeypatch):
    teacher, train, _ = teacher_and_data
    monkeypatch.chdir(tmp_path)
    kw = dict(steps=2, seq_len=T, batch_size=8, save_every=0, eval_every=0, progress=False, plot=False)
    distill(small_student(), teacher, train, config=DistillConfig(**kw))  # default output_dir "run/"
    with pytest.raises(ValueError, match="run holds a different distillation run.*training data"):
        distill(small_student(), teacher, train.flip(0), config=DistillConfig(**kw))
    # the same call again is the same run: it resumes (here: is already finished) instead of retraining
    seen = []
    distill(small_student(), teacher, train, config=DistillConfig(**kw), callbacks=[lambda s, m, st: seen.append(s)])
    assert seen == []


def test_bit_flipped_checkpoint_is_named_and_never_the_last_good_one(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=2, save_every=1))
    weights = tmp_path / "checkpoints" / "step_000002" / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x10  # one bit of a tensor: the file still loads, only its recorded hash tells
    weights.write_bytes(bytes(data))
    assert last_good_checkpoint(tmp_path).name == "step_000001"
    seen = []
    with pytest.warns(UserWarning, match=r"step_000002/student/model.safetensors is corrupt.*SHA-256.*older "
                                         r"checkpoint .*step_000001"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=3, save_every=1),
                callbacks=[lambda s, m, st: seen.append(s)])
    assert seen == [2, 3]  # resumed from step 1; step 2 was redone and saved again
    assert last_good_checkpoint(tmp_path).name == "step_000003"


def test_removed_latest_resumes_from_the_newest_checkpoint(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=2, save_every=1))
    (tmp_path / LATEST).unlink()
    seen = []
    with pytest.warns(UserWarning, match=r"latest is missing; resuming from the newest checkpoint .*step_000002"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=3, save_every=1),
                callbacks=[lambda s, m, st: seen.append(s)])
    assert seen == [3]  # not a restart from step 0 over the saved checkpoints


def test_a_crash_between_recording_and_renaming_leaves_the_run_resumable(teacher_and_data, tmp_path, monkeypatch):
    teacher, train, _ = teacher_and_data
    real = os.replace

    def crash(src, dst):  # kill -9 right after the marker accepted the new `latest`, before the rename
        if Path(dst).name == LATEST and Path(src).read_text().startswith("step_000002"):
            raise _Stop
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(_Stop):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=3, save_every=1))
    monkeypatch.setattr(os, "replace", real)
    seen = []
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=3, save_every=1),
            callbacks=[lambda s, m, st: seen.append(s)])  # no overwrite needed: every file is still proven
    assert seen == [2, 3]


def test_overwrite_never_deletes_a_users_final_folder(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    final = tmp_path / "final"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    (final / "config.json").write_text("{}")  # a name minitron writes: replaced by name
    with pytest.raises(ValueError, match="not empty and was not written by `minitron distill`"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=1))
    for resume in (True, False):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=1, overwrite=True, resume=resume))
        assert (final / "notes.txt").read_text() == "mine" and (final / "model.safetensors").is_file()
        assert LlamaForCausalLM.from_pretrained(final).config.hidden_size == 16


def test_forged_distill_marker_never_exposes_a_users_run_files(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    (tmp_path / "metrics.jsonl").write_text('{"my": "measurements"}\n')
    (tmp_path / ".minitron-output.json").write_text('{"kind": "distill", "files": {}}')
    with pytest.raises(ValueError, match="holds metrics.jsonl, which minitron did not write"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=1))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"my": "measurements"}\n'


# ---- one process per run directory --------------------------------------------------------------------


def test_lock_names_the_other_process_and_stale_locks_are_taken_over(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from minitron.runlock import acquire
        lock = acquire({str(run)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError, match=f"in use by another minitron process \\(pid {holder.pid}\\)"):
            distill(small_student(), teacher, train, config=quick_cfg(run, steps=1))
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "metrics.jsonl").exists()
    (run / ".minitron.lock").write_text("999999999\n")  # left by a killed run
    distill(small_student(), teacher, train, config=quick_cfg(run, steps=1))
    with acquire(run):  # released at the end of the run
        pass


# ---- config validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("save_every", -1), ("keep_checkpoints", -2), ("keep_checkpoints", 0),
                                         ("steps", 2.5), ("steps", True), ("eval_every", -3), ("lr", float("nan")),
                                         ("seq_len", 16.0), ("jsd_beta", 7), ("jsd_beta", -0.1)])
def test_config_rejects_bad_counts(field, value):
    with pytest.raises(ValueError, match=f"DistillConfig: {field} must be"):
        DistillConfig(**{field: value})


def test_standalone_distill_cli_reports_one_line(capsys):
    from minitron.cli.distill import main as distill_main

    assert distill_main(["--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps must be an integer >= 1, got 0" in err


def test_student_is_teacher_and_non_finite_models_are_refused_before_training(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    with pytest.raises(ValueError, match="the student and the teacher are the same model.*copy.deepcopy"):
        distill(teacher, teacher, train, config=quick_cfg(tmp_path / "same", steps=1))
    student = small_student()
    student.lm_head = teacher.lm_head  # a "student" that shares a tensor with the teacher
    with pytest.raises(ValueError, match=r"models sharing 1 parameter tensor\(s\)"):
        distill(student, teacher, train, config=quick_cfg(tmp_path / "shared", steps=1))
    broken = tiny(seed=0)
    with torch.no_grad():
        broken.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"the teacher's weight model.layers.0.mlp.up_proj.weight holds NaN/inf"):
        distill(small_student(), broken, train, config=quick_cfg(tmp_path / "inf", steps=1))
    assert not any((tmp_path / d).exists() for d in ("same", "shared", "inf"))


def test_cli_rejects_negative_save_every(teacher_and_data, tmp_path, capsys):
    teacher, train, _ = teacher_and_data
    small_student().save_pretrained(tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    torch.save(train[:32], tmp_path / "ids.pt")
    base = ["distill", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--data", str(tmp_path / "ids.pt"), "--output-dir", str(tmp_path / "run")]
    assert main([*base, "--save-every", "-1"]) == 2
    assert "save_every must be an integer >= 0" in capsys.readouterr().err
    assert main([*base, "--keep-checkpoints", "-2"]) == 2
    assert main(["distill", "--student", "org/not-a-local-model", "--teacher", str(tmp_path / "teacher"),
                 "--data", str(tmp_path / "ids.pt"), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "org/not-a-local-model" in err and "not found locally" in err
    assert not (tmp_path / "run").exists()


# ---- vocabularies, precision, kernels -------------------------------------------------------------------


def padded_teacher(teacher: LlamaForCausalLM, extra: int) -> LlamaForCausalLM:
    """``teacher`` with ``extra`` zero lm_head/embedding rows appended (padding, as in Qwen2.5)."""
    padded = tiny(seed=0)
    padded.load_state_dict(teacher.state_dict())
    padded.resize_token_embeddings(V + extra, mean_resizing=False)
    with torch.no_grad():
        padded.lm_head.weight[V:].zero_()
        padded.model.embed_tokens.weight[V:].zero_()
    return padded.eval()


def test_teacher_with_padded_vocab_distils_over_the_shared_vocab(teacher_and_data, tmp_path):
    teacher, train, held_out = teacher_and_data
    with torch.no_grad():
        sharp = tiny(seed=0)
        sharp.load_state_dict(teacher.state_dict())
        sharp.lm_head.weight.mul_(4)  # confident teacher: its padding rows get ~no probability
    ref_kw = dict(steps=2, eval_every=2)
    distill(small_student(), sharp, train, held_out, config=quick_cfg(tmp_path / "ref", **ref_kw))
    distill(small_student(), padded_teacher(sharp, 16), train, held_out, config=quick_cfg(tmp_path / "pad", **ref_kw))
    for split in ("train", "eval"):
        for a, b in zip(rows(tmp_path / "ref", split), rows(tmp_path / "pad", split)):
            key = "loss" if split == "train" else "kl_to_teacher"
            assert b[key] == pytest.approx(a[key], rel=1e-3), (split, a, b)

    # extra rows that carry real probability are not padding: refused before training
    real = padded_teacher(sharp, 16)
    with torch.no_grad():
        real.lm_head.weight[V:] = sharp.lm_head.weight[:16]  # 16 more real tokens
    with pytest.raises(ValueError, match=r"teacher puts up to .* of its probability on ids >= 64"):
        distill(small_student(), real, train, config=quick_cfg(tmp_path / "real"))


def test_zero_padding_rows_are_padding_even_for_an_unsure_teacher(tmp_path):
    unsure = tiny(seed=0).eval()  # flat distributions: exp(0) rows would get ~20% of the probability
    data = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(0))
    ref = distill(small_student(), unsure, data, config=quick_cfg(tmp_path / "ref", steps=1))
    pad = distill(small_student(), padded_teacher(unsure, 16), data, config=quick_cfg(tmp_path / "pad", steps=1))
    assert rows(tmp_path / "pad", "train")[0]["loss"] == pytest.approx(rows(tmp_path / "ref", "train")[0]["loss"], rel=1e-4)
    assert torch.allclose(ref.lm_head.weight, pad.lm_head.weight, atol=1e-5)


def test_student_with_padded_vocab_refuses_reverse_kl_and_trains_otherwise(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    padded = small_student()
    padded.resize_token_embeddings(V + 16, mean_resizing=False)
    with torch.no_grad():
        padded.lm_head.weight[V:].zero_()
        padded.model.embed_tokens.weight[V:].zero_()
    for loss, beta in (("reverse_kl", 0.5), ("jsd", 1.0)):
        with pytest.raises(ValueError, match=rf"logits_loss='{loss}'.* is infinite here: the student's lm_head has 80 "
                                             r"rows, the teacher's 64.*resize_token_embeddings\(64\)"):
            distill(padded, teacher, train, config=quick_cfg(tmp_path / loss, logits_loss=loss, jsd_beta=beta))
        assert not (tmp_path / loss).exists()
    for loss in ("forward_kl", "jsd"):  # finite: the student is pushed off the teacher's impossible ids
        distill(padded, teacher, train, config=quick_cfg(tmp_path / f"ok-{loss}", steps=2, logits_loss=loss))
        assert all(math.isfinite(r["loss"]) for r in rows(tmp_path / f"ok-{loss}", "train"))


def test_bf16_mixed_precision_on_cpu(teacher_and_data, tmp_path):
    """mixed_precision="bf16" on CPU: the student's GEMMs run in bf16 (autocast on), its master weights stay
    fp32 and train, and the first step's loss is the fp32 run's to bf16 precision (close, not equal: bf16 ran)."""
    teacher, train, _ = teacher_and_data
    first_loss, gemm_dtypes = {}, {}
    for mp in ("fp32", "bf16"):
        student = small_student()
        before = [p.detach().clone() for p in student.parameters()]
        dtypes = gemm_dtypes.setdefault(mp, set())
        hook = student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
        trained = distill(student, teacher, train, config=quick_cfg(tmp_path / mp, steps=2, mixed_precision=mp))
        hook.remove()
        losses = [r["loss"] for r in rows(tmp_path / mp, "train")]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
        assert all(p.dtype == torch.float32 for p in trained.parameters())  # fp32 master weights
        assert any(not torch.equal(p, b) for p, b in zip(trained.parameters(), before))  # and they trained
        first_loss[mp] = losses[0]
    assert gemm_dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert first_loss["bf16"] != first_loss["fp32"]
    assert abs(first_loss["bf16"] - first_loss["fp32"]) <= 0.02 * first_loss["fp32"], first_loss


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_triton_loss_without_gpu_is_a_clear_error(teacher_and_data, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    teacher, train, _ = teacher_and_data
    with pytest.raises(ValueError, match="loss_impl='triton' needs a CUDA GPU"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, loss_impl="triton"))


def test_read_rows_skips_a_partial_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st', encoding="utf-8")
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
