"""End-to-end tests of ``minitron.distillation.distill`` on tiny Llama models (CPU, fixed seeds)."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import LlamaForCausalLM

from minitron.distillation import NonFiniteLossError, distill
from minitron.distillation.checkpoint import latest_checkpoint, load_student_state
from tests.helpers import T, V, quick_cfg, rows, small_student


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_kd_lowers_kl_and_beats_ce(teacher_and_data, tmp_path):
    teacher, train, held_out = teacher_and_data
    final = {}
    for name, kw in (("kd", dict(kd_weight=1.0, clm_weight=0.0)), ("ce", dict(kd_weight=0.0, clm_weight=1.0))):
        student = small_student()
        cfg = quick_cfg(tmp_path / name, steps=60, batch_size=16, warmup_steps=5, eval_every=30, **kw)
        distill(student, teacher, train, eval_data=held_out, config=cfg)
        evals = rows(tmp_path / name, "eval")
        assert [e["step"] for e in evals] == [0, 30, 60]
        final[name] = evals[-1]
        if name == "kd":  # KL to teacher and held-out LM loss both go down
            assert evals[-1]["kl_to_teacher"] < 0.5 * evals[0]["kl_to_teacher"]
            assert evals[-1]["lm_loss"] < evals[0]["lm_loss"] - 1.0
            # output_dir/final is a standard HF checkpoint equal to the returned student
            reloaded = LlamaForCausalLM.from_pretrained(tmp_path / name / "final")
            x = held_out[:2]
            torch.testing.assert_close(reloaded(x).logits, student(x).logits)
    print("held-out after 60 steps:", {k: (round(v["lm_loss"], 4), round(v["kl_to_teacher"], 4)) for k, v in final.items()},
          "teacher LM loss", round(final["kd"]["teacher_lm_loss"], 4))
    assert final["kd"]["lm_loss"] < final["ce"]["lm_loss"] - 0.05
    assert final["kd"]["kl_to_teacher"] < final["ce"]["kl_to_teacher"] - 0.05


class _Interrupt(Exception):
    pass


def test_resume_reproduces_uninterrupted_losses(teacher_and_data, tmp_path):
    teacher, train, held_out = teacher_and_data
    kw = dict(steps=8, save_every=3, grad_accum=2, intermediate_layers=[(0, 1)], intermediate_loss="cosine",
              clm_weight=0.5, weight_decay=0.1)
    student_kw = dict(attention_dropout=0.1)  # dropout: the restored RNG state matters

    distill(small_student(**student_kw), teacher, train, config=quick_cfg(tmp_path / "full", **kw))
    ref = torch.tensor([r["loss"] for r in rows(tmp_path / "full", "train")])

    def stop_at_5(step, metrics, student):
        if step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        distill(small_student(**student_kw), teacher, train, config=quick_cfg(tmp_path / "cut", **kw), callbacks=[stop_at_5])
    assert latest_checkpoint(tmp_path / "cut").name == "step_000003"
    # a fresh process would build a fresh student: a different init must not matter
    seen = []
    distill(small_student(seed=7, **student_kw), teacher, train, config=quick_cfg(tmp_path / "cut", **kw),
            callbacks=[lambda step, m, s: seen.append(step)])
    assert seen == [4, 5, 6, 7, 8]  # continued after the step-3 checkpoint
    got_rows = rows(tmp_path / "cut", "train")
    assert [r["step"] for r in got_rows] == list(range(1, 9))
    got = torch.tensor([r["loss"] for r in got_rows])
    assert torch.allclose(got, ref, rtol=1e-6, atol=0), (got, ref)
    a = load_student_state(tmp_path / "full" / "final")
    b = load_student_state(tmp_path / "cut" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_nan_loss_names_step_and_keeps_last_good_checkpoint(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data

    def poison(step, metrics, student):
        if step == 3:
            with torch.no_grad():
                student.lm_head.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="step 4") as info:
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, save_every=2), callbacks=[poison])
    assert isinstance(info.value, ValueError)
    last = latest_checkpoint(tmp_path)
    assert last.name == "step_000002" and str(last) in str(info.value)
    assert all(torch.isfinite(v).all() for v in load_student_state(last / "student").values())
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("data", [torch.tensor([], dtype=torch.long), [], torch.arange(10)])
def test_empty_data_raises(teacher_and_data, tmp_path, data):
    with pytest.raises(ValueError, match="empty"):
        distill(small_student(), teacher_and_data[0], data, config=quick_cfg(tmp_path))


def test_too_long_seq_len_raises(teacher_and_data, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        distill(small_student(), teacher_and_data[0], teacher_and_data[1], config=quick_cfg(tmp_path, seq_len=128))


class _FakeTok:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.eos_token_id = None

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_vocab_mismatch_raises(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    with pytest.raises(ValueError, match="token id 99"):  # ids beyond both vocabularies
        distill(small_student(), teacher, torch.full((4, T), 99), config=quick_cfg(tmp_path))
    tok_s = _FakeTok({f"t{i}": i for i in range(V)})
    tok_t = _FakeTok({f"t{(i * 7) % V}": i for i in range(V)})  # same size, different ids
    with pytest.raises(ValueError, match="tokenizers differ"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path), tokenizer=tok_s, teacher_tokenizer=tok_t)
    with pytest.raises(ValueError, match="cannot be reconciled"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path), tokenizer=_FakeTok({f"t{i}": i for i in range(V + 5)}))


def test_cli_register_and_run(teacher_and_data, tmp_path):
    from minitron.cli import distill as cli

    teacher, train, _ = teacher_and_data
    teacher.save_pretrained(tmp_path / "teacher")
    small_student().save_pretrained(tmp_path / "student")
    torch.save(train[:32], tmp_path / "ids.pt")
    parser = argparse.ArgumentParser(prog="minitron")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                              "--data", str(tmp_path / "ids.pt"), "--steps", "2", "--seq-len", str(T), "--batch-size", "4",
                              "--output-dir", str(tmp_path / "run"), "--intermediate-layers", "0:1", "--no-progress"])
    assert args.func(args) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
