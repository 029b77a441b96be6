"""``minitron.integrations.hf.KDTrainer``: the HF Trainer path matches ``minitron.distill`` and a naive reference.

Exact match with ``distill`` needs the same data order, optimizer and schedule: the HF run gets the blocks
in the order ``distill``'s ``batch_indices`` draws them (``train_sampling_strategy="sequential"``), AdamW
with the same betas / eps / no weight decay, a constant learning rate (``distill`` with
``min_lr == lr`` and no warmup), the same clipping, and ``kd_positions="all"`` (``distill`` distills
every position of a packed block). What remains is fp32 summation order (the optimizer's foreach
kernels, the gradient-accumulation sum), hence the 1e-5 tolerances.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from tests.helpers import T, V, quick_cfg, rows, small_student, tiny

transformers = pytest.importorskip("transformers")
from transformers import DataCollatorForLanguageModeling, TrainingArguments  # noqa: E402

from minitron.distillation import distill  # noqa: E402
from minitron.distillation.data import batch_indices  # noqa: E402
from minitron.distillation.module import DistillModule  # noqa: E402
from minitron.integrations.hf import KDTrainer  # noqa: E402
from minitron.losses import LinearKDLoss  # noqa: E402
from tests.test_linear_kd_loss import naive_kd  # noqa: E402


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
                train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def test_loss_and_first_steps_match_distill(tmp_path):
    from datasets import Dataset

    teacher, student0 = tiny(seed=0), small_student(seed=1)
    blocks = torch.randint(0, V, (16, T), generator=torch.Generator().manual_seed(0))
    steps, bsz, accum = 3, 4, 2
    cfg = quick_cfg(tmp_path / "distill", steps=steps, batch_size=bsz, grad_accum=accum, lr=1e-2, min_lr=1e-2,
                    warmup_steps=0, mixed_precision="fp32", loss_impl="chunked", max_grad_norm=1.0)
    s_distill = distill(copy.deepcopy(student0), copy.deepcopy(teacher), blocks, config=cfg)
    ref = rows(tmp_path / "distill", "train")

    order = torch.cat([batch_indices(16, cfg.seed, s, m, bsz, accum) for s in range(steps) for m in range(accum)])
    ds = Dataset.from_dict({"input_ids": blocks[order].tolist()})
    s_hf, t_hf = copy.deepcopy(student0), copy.deepcopy(teacher)
    trainer = KDTrainer(model=s_hf, args=_args(tmp_path / "hf"), teacher_model=t_hf, train_dataset=ds,
                        kd_positions="all")
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == steps == len(ref)
    for got, want in zip(logged, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (got, want)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), (got, want)
    assert ref[0]["loss"] != pytest.approx(ref[-1]["loss"], rel=1e-3)  # the steps did change the student
    for (name, a), b in zip(s_hf.named_parameters(), s_distill.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(not p.requires_grad for p in t_hf.parameters()) and not t_hf.training
    for a, b in zip(t_hf.parameters(), teacher.parameters()):
        assert torch.equal(a, b)  # the teacher never trains


def test_first_step_loss_and_gradient_equal_distill_module(tmp_path):
    teacher, student = tiny(seed=0), small_student(seed=1)
    x = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(2))
    cfg = quick_cfg(tmp_path, temperature=2.0, top_k=7)
    mod = DistillModule(copy.deepcopy(student), teacher.eval().requires_grad_(False), cfg)
    want = mod(x)["loss"]
    g_want = torch.autograd.grad(want, list(mod.student.parameters()))
    trainer = KDTrainer(model=student, args=_args(tmp_path / "hf"), teacher_model=teacher, kd_positions="all",
                        kd_loss=LinearKDLoss(0.0, 1.0, beta=0.0, temperature=2.0, top_k=7, tau_squared=True))
    got = trainer.compute_loss(student, {"input_ids": x})
    g_got = torch.autograd.grad(got, list(student.parameters()))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _padded_batches(tok):
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, V, (n,), generator=g).tolist() for n in (7, 3, 11, 5, 9)]  # ids >= 1: 0 is the pad
    coll = DataCollatorForLanguageModeling(tok, mlm=False)
    return seqs, [coll([{"input_ids": s} for s in seqs[:2]]), coll([{"input_ids": s} for s in seqs[2:]])]


def _tokenizer():
    from transformers import AutoTokenizer

    from minitron.data import BUILTIN_MODEL

    tok = AutoTokenizer.from_pretrained(BUILTIN_MODEL)
    tok.pad_token = tok.convert_ids_to_tokens(0)
    return tok


def test_padded_collator_batches_with_accumulation_match_naive(tmp_path):
    """HF collator batches (right padding, labels -100) split over two micro-batches == one naive sum / count."""
    teacher, student = tiny(seed=0), small_student(seed=1)
    seqs, batches = _padded_batches(_tokenizer())
    assert (batches[0]["labels"] == -100).any()
    opts = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.4, temperature=2.0)
    trainer = KDTrainer(model=student, args=_args(tmp_path), teacher_model=teacher, kd_loss=LinearKDLoss(**opts))
    n_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    assert int(n_items) == sum(len(s) - 1 for s in seqs)  # HF's count: the next-token labels
    got = sum(trainer.compute_loss(student, b, num_items_in_batch=n_items) for b in batches)
    g_got = torch.autograd.grad(got, list(student.parameters()))

    want = 0.0
    ws, wt = student.lm_head.weight, teacher.lm_head.weight
    for s in seqs:  # each sequence alone, unpadded, full logits
        x = torch.tensor([s])
        h_s = student.model(input_ids=x).last_hidden_state[0, :-1]
        with torch.no_grad():
            h_t = teacher.model(input_ids=x).last_hidden_state[0, :-1]
        want = want + naive_kd(h_s, ws, h_t, wt, x[0, 1:], num_items_in_batch=n_items, **opts)
    g_want = torch.autograd.grad(want, list(student.parameters()))
    assert got.item() == pytest.approx(want.item(), rel=2e-5)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


def test_attention_mask_drops_padding_whatever_the_labels(tmp_path):
    """Labels that keep the pad ids (a collator that does not write -100): the attention mask still drops them."""
    teacher, student = tiny(seed=0), small_student(seed=1)
    _, batches = _padded_batches(_tokenizer())
    trainer = KDTrainer(model=student, args=_args(tmp_path), teacher_model=teacher,
                        kd_loss=LinearKDLoss(0.5, 0.5, beta=0.0))
    b = batches[1]
    assert (b["attention_mask"] == 0).any()
    raw = {**b, "labels": b["input_ids"].clone()}  # pad ids as labels
    for mode in ("labels", "all"):
        trainer.kd_positions = mode
        want = trainer.compute_loss(student, b)
        assert trainer.compute_loss(student, raw).item() == pytest.approx(want.item(), rel=1e-6), mode
    assert int(trainer._count(raw)) == int(b["attention_mask"].sum())  # "all": every real token


def test_train_with_collator_saves_no_teacher(tmp_path):
    from datasets import Dataset

    teacher, student = tiny(seed=0), small_student(seed=1)
    tok = _tokenizer()
    seqs, _ = _padded_batches(tok)
    ds = Dataset.from_dict({"input_ids": seqs * 2})
    trainer = KDTrainer(model=student, args=_args(tmp_path, per_device_train_batch_size=2, max_steps=2),
                        teacher_model=teacher, train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                        kd_loss=LinearKDLoss(0.5, 0.5, beta=0.0))
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    metrics = trainer.evaluate(ds)  # prediction_step goes through compute_loss too
    assert metrics["eval_loss"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    trainer.save_model(str(tmp_path / "final"))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(saved) <= set(student.state_dict()) and len(saved) > 0
    n_student = sum(p.numel() for p in student.parameters())
    assert sum(t.numel() for t in saved.values()) <= n_student  # no teacher tensor in the checkpoint


def test_readme_compute_loss_pattern_in_a_plain_trainer_equals_kdtrainer(tmp_path):
    """README's TRL recipe (``batch_kd_loss`` in a Trainer's compute_loss, HF's own num_items_in_batch)."""
    from datasets import Dataset
    from transformers import Trainer

    from minitron.integrations.hf import batch_kd_loss

    teacher, student0 = tiny(seed=0), small_student(seed=1)
    tok = _tokenizer()
    seqs, _ = _padded_batches(tok)
    ds = Dataset.from_dict({"input_ids": seqs * 2})
    kd = LinearKDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.0)

    class KDSFTTrainer(Trainer):  # what README shows for trl.SFTTrainer / GKDTrainer
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _, _ = batch_kd_loss(model, teacher, inputs, kd, num_items_in_batch=num_items_in_batch)
            return loss

    losses = []
    for cls, extra in ((KDSFTTrainer, {}), (KDTrainer, dict(teacher_model=teacher, kd_loss=kd))):
        student = copy.deepcopy(student0)
        tr = cls(model=student, args=_args(tmp_path / cls.__name__, per_device_train_batch_size=2, max_steps=2),
                 train_dataset=ds, data_collator=DataCollatorForLanguageModeling(tok, mlm=False), **extra)
        tr.train()
        losses.append([r["loss"] for r in tr.state.log_history if "loss" in r])
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(kd_positions="every"), "kd_positions='every'; allowed values: labels, all"),
    (dict(teacher_model="student"), "teacher_model must be a separate model"),
    (dict(kd_loss=torch.nn.MSELoss()), "kd_loss must be a minitron.losses.LinearKDLoss"),
])
def test_bad_arguments(tmp_path, kw, match):
    student = small_student(seed=1)
    kw = {"teacher_model": tiny(seed=0), **kw}
    if kw["teacher_model"] == "student":
        kw["teacher_model"] = student
    with pytest.raises(ValueError, match=match):
        KDTrainer(model=student, args=_args(tmp_path), **kw)


def test_bad_labels_shape_and_nan_loss(tmp_path):
    teacher, student = tiny(seed=0), small_student(seed=1)
    trainer = KDTrainer(model=student, args=_args(tmp_path), teacher_model=teacher)
    x = torch.randint(0, V, (2, 6))
    with pytest.raises(ValueError, match="labels have shape"):
        trainer.compute_loss(student, {"input_ids": x, "labels": x[:, 1:]})
    with torch.no_grad():
        student.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite KD loss"):
        trainer.compute_loss(student, {"input_ids": x})


def test_import_minitron_does_not_import_the_integration():
    code = "import sys, minitron; assert 'minitron.integrations.hf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
