"""The distillation step's runtime: threads, bf16 mixed precision on CPU, the time budget and its LR plan."""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from minitron.distillation import DistillConfig, distill
from minitron.distillation import precision as P
from minitron.distillation import runtime as R
from minitron.distillation.checkpoint import latest_checkpoint
from minitron.distillation.module import DistillModule
from minitron.distillation.optim import CosineSchedule, make_optimizer
from minitron.distillation.time_budget import TimeBudget
from tests.helpers import V, quick_cfg, rows, small_student, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# bf16 autocast vs fp32, one KD step of a 1-layer student (hidden 24) on a 2-layer teacher (hidden 48), 6 x 29
# tokens: measured relative gradient error 0.43% (teacher weights fp32) / 0.52% (teacher weights bf16), loss
# difference 2e-4 relative. The bounds leave 4x room for other CPUs / oneDNN versions.
BF16_GRAD_REL_TOL = 0.02
BF16_LOSS_REL_TOL = 2e-3


def _step_grads(teacher, x, bf16: bool, teacher_bf16: bool):
    student = tiny(hidden=24, layers=1, heads=2, kv=1, inter=40, seed=1)
    module = DistillModule(student, teacher, DistillConfig(loss_impl="chunked"))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with P.frozen_in_bf16(teacher, teacher_bf16), amp:
        out = module(x)
        out["loss"].backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in student.parameters())  # fp32 master
    return float(out["loss"]), torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.mark.parametrize("teacher_bf16", [False, True])
def test_bf16_step_gradient_error_vs_fp32(teacher_bf16):
    teacher = tiny(hidden=48, layers=2, heads=4, kv=2, inter=72, seed=0).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)  # peaked teacher: a KD loss with signal
    x = torch.randint(0, V, (6, 29), generator=torch.Generator().manual_seed(0))  # odd length
    loss32, g32 = _step_grads(teacher, x, bf16=False, teacher_bf16=False)
    loss16, g16 = _step_grads(teacher, x, bf16=True, teacher_bf16=teacher_bf16)
    rel = float((g16 - g32).norm() / g32.norm())
    print(f"bf16 step (teacher weights {'bf16' if teacher_bf16 else 'fp32'}): grad rel err {rel:.4%}, "
          f"loss {loss32:.6f} -> {loss16:.6f}")
    assert 1e-5 < rel < BF16_GRAD_REL_TOL  # > 0: bf16 really ran
    assert abs(loss16 - loss32) <= BF16_LOSS_REL_TOL * abs(loss32)


def test_frozen_in_bf16_restores_the_exact_weights():
    teacher = tiny(seed=0, tie_word_embeddings=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with P.frozen_in_bf16(teacher):
        assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
        assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # tie kept
    after = teacher.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_auto_precision_follows_the_cpu(monkeypatch, teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    losses = {}
    for name, flags in (("fast", "/proc/cpuinfo flags amx_bf16"), ("slow", None)):
        monkeypatch.setattr(P, "fast_bf16_cpu", lambda flags=flags: flags)
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path / name, steps=6))
        first = rows(tmp_path / name, "train")[0]
        assert first["precision"] == ("bf16" if flags else "fp32")
        assert (flags or "no AMX") in first["precision_reason"]
        assert first["teacher_weights"] == ("bf16" if flags else "as loaded") and first["threads"] == 1
        losses[name] = torch.tensor([r["loss"] for r in rows(tmp_path / name, "train")])
    diff = float(((losses["fast"] - losses["slow"]) / losses["slow"]).abs().max())
    print(f"6-step loss trajectory, bf16 vs fp32: max relative difference {diff:.2e}")
    assert 0 < diff < 0.02  # bf16 ran (differs) and follows the fp32 trajectory
    assert torch.get_num_threads() == 1  # restored


def test_threads_applied_for_the_run_and_restored(teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    seen = []
    torch.set_num_threads(1)
    distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=2, threads=2),
            callbacks=[lambda step, row, s: seen.append(torch.get_num_threads())])
    assert seen == [2, 2] and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        DistillConfig(threads=0)


def test_physical_cores_counts_siblings_once(monkeypatch, tmp_path):
    topo = {0: ("0", "0"), 1: ("0", "0"), 2: ("0", "1"), 3: ("0", "1")}  # 2 cores x 2 hyper-threads
    real_path = R.Path

    def fake_path(p):
        for c, (pkg, core) in topo.items():
            base = f"/sys/devices/system/cpu/cpu{c}/topology"
            if str(p) == base:
                d = tmp_path / f"cpu{c}"
                d.mkdir(exist_ok=True)
                (d / "physical_package_id").write_text(pkg)
                (d / "core_id").write_text(core)
                return d
        return real_path(tmp_path / "missing")

    monkeypatch.setattr(R, "usable_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(R, "Path", fake_path)
    R.physical_cores.cache_clear()
    try:
        assert R.physical_cores() == 2
    finally:
        R.physical_cores.cache_clear()


def test_oversubscribed_machine_warns(monkeypatch, teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    monkeypatch.setattr(R, "load_average", lambda: 99.0)
    with pytest.warns(UserWarning, match=r"oversubscribed \(1-minute load average 99.0 > \d+ usable physical cores\)"
                                         r".*mean nothing.*--threads 1"):
        distill(small_student(), teacher, train, config=quick_cfg(tmp_path, steps=1, threads=2))
    monkeypatch.setattr(R, "load_average", lambda: 0.0)
    assert R.oversubscription_warning(2) is None


def test_schedule_plan_survives_the_scheduler_state(tmp_path):
    cfg = DistillConfig(steps=100, warmup_steps=2, lr=1.0, min_lr=0.1)
    opt, sched = make_optimizer([("w", torch.nn.Parameter(torch.zeros(2, 2)))], cfg)
    sched.lr_lambdas[0].plan(12)
    assert sched.lr_lambdas[0](12) == pytest.approx(0.1) and sched.lr_lambdas[0](7) > 0.1
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    _, fresh = make_optimizer([("w", torch.nn.Parameter(torch.zeros(2, 2)))], cfg)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.lr_lambdas[0].horizon == 12 and fresh.lr_lambdas[0].planned
    assert CosineSchedule(cfg)(100) == pytest.approx(0.1)  # unplanned: over steps


def test_time_budget_predictions():
    b = TimeBudget(10.0, start=time.perf_counter())
    assert b.fits_next(with_eval=True) and b.step_estimate() is None
    for t in (5.0, 1.0, 1.2, 0.8):  # the first (warm-up) step is left out of the estimate
        b.record_step(t)
    assert b.step_estimate() == pytest.approx(1.0)
    b.record_save(0.5)
    b.record_eval(1.0)
    assert b.closing_estimate(with_eval=True) == pytest.approx(2.0) and b.closing_estimate(False) == pytest.approx(1.0)
    assert 6 <= b.steps_that_fit(3, with_eval=True) - 3 <= 7  # (10 - 2) // 1, minus the time this test took
    b.start -= 8.5  # 1.5 s left: one step (1.0) + closing (2.0) no longer fits
    assert not b.fits_next(with_eval=True)
    with pytest.raises(ValueError, match="time_budget_s must be a number of seconds > 0"):
        DistillConfig(time_budget_s=0)


def _slow_steps(model, seconds):
    return model.model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_time_budget_stops_cleanly_and_resumes(teacher_and_data, tmp_path):
    teacher, train, held_out = teacher_and_data
    student = small_student()
    hook = _slow_steps(student, 0.25)  # each train step >= 0.25 s, each eval batch too
    budget, steps = 4.0, 200
    cfg = quick_cfg(tmp_path, steps=steps, warmup_steps=2, time_budget_s=budget, eval_batches=1, plot=False)
    t0 = time.perf_counter()
    distill(student, teacher, train, eval_data=held_out, config=cfg)
    took = time.perf_counter() - t0
    hook.remove()
    train_rows, stop = rows(tmp_path, "train"), rows(tmp_path, "stop")
    done = train_rows[-1]["step"]
    print(f"budget {budget} s: stopped after {done} steps in {took:.1f} s; {stop[0]['reason']}")
    assert 3 <= done < steps and len(stop) == 1 and stop[0]["step"] == done and "time budget" in stop[0]["reason"]
    assert took < budget + 3.0  # stopped near the budget (slack: a loaded machine)
    planned = [r["lr_horizon"] for r in train_rows if "lr_horizon" in r]
    assert len(planned) == 1 and planned[0] < steps  # laid out over the steps that fit, not over 200
    assert train_rows[-1]["lr"] < 0.5 * cfg.lr  # the cosine was well down by the stop, not at its start
    assert rows(tmp_path, "eval")[-1]["step"] == done  # the closing evaluation
    assert latest_checkpoint(tmp_path).name.endswith(str(done)) and (tmp_path / "final" / "config.json").exists()
    # resume from the budget stop: same run, no budget, a few more steps
    more = quick_cfg(tmp_path, steps=done + 2, warmup_steps=2, eval_batches=1, plot=False)
    distill(small_student(), teacher, train, eval_data=held_out, config=more)
    assert [r["step"] for r in rows(tmp_path, "train")][-3:] == [done, done + 1, done + 2]


def test_cli_flags():
    from minitron.cli.distill import BUDGET_BOUND_STEPS, BUILTIN_JOB, _add_arguments, config_from_args

    p = argparse.ArgumentParser()
    _add_arguments(p)
    cfg = config_from_args(p.parse_args(["--time-budget", "1.5", "--threads", "1", "--mixed-precision", "no"]))
    assert (cfg.time_budget_s, cfg.threads, cfg.mixed_precision) == (90.0, 1, "no")
    assert config_from_args(p.parse_args([])).threads is None
    # a budget with no --steps is bounded by the budget alone; an explicit --steps still caps it
    assert cfg.steps == BUDGET_BOUND_STEPS
    assert config_from_args(p.parse_args(["--time-budget", "1.5", "--steps", "7"])).steps == 7
    assert config_from_args(p.parse_args([])).steps == BUILTIN_JOB["steps"]
    with pytest.raises(ValueError, match="--time-budget must be a number of minutes > 0"):
        config_from_args(p.parse_args(["--time-budget", "0"]))


def test_collapsed_tokens_per_s_on_a_loaded_machine_warns(monkeypatch, teacher_and_data, tmp_path):
    teacher, train, _ = teacher_and_data
    student = small_student()
    calls = []

    def slow_from_step_5(*_):  # returns None: the forward's arguments are kept
        calls.append(1)
        if len(calls) > 4:
            time.sleep(0.5)

    hook = student.model.register_forward_pre_hook(slow_from_step_5)
    monkeypatch.setattr(R, "load_average", lambda: 99.0)
    with pytest.warns(UserWarning, match=r"tokens/s collapsed to \d+ from \d+ \(load average 99.0"):
        distill(student, teacher, train, config=quick_cfg(tmp_path, steps=6))
    hook.remove()
    warned = [r for r in rows(tmp_path, "train") if "warning" in r]
    assert len(warned) == 1 and warned[0]["step"] == 5 and "mean nothing" in warned[0]["warning"]


def test_default_threads_share_the_cores_among_local_ranks(monkeypatch):
    monkeypatch.setattr(R, "physical_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert R.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert R.default_threads() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert R.default_threads() == 8
