"""Wall-clock budget of a distillation run (``DistillConfig.time_budget_s``, ``--time-budget MINUTES``).

Checked between optimizer steps: the next step is started only if it and the run's closing work (a
checkpoint, the final evaluation if there is eval data, ``final/``) are predicted to fit in what is
left. Predictions use the measured costs: the median step time (the first step, which pays one-off
allocation and warm-up costs, is left out once later steps exist), the last evaluation and the last
save (one step's time until a save was measured).

The LR schedule: once ``max(warmup_steps, 2)`` steps were measured, the cosine is laid out over the
steps predicted to fit or over ``steps``, whichever is smaller, and never re-planned (a run that
stops early then ends at ``min_lr`` instead of in mid-decay; a resumed run keeps the saved horizon).
"""

from __future__ import annotations

import statistics
import time


class TimeBudget:
    """Measured step/eval/save costs against a deadline.

    Args:
        seconds: the budget.
        start: ``time.perf_counter()`` value the budget counts from (default: now).
    Example:
        >>> b = TimeBudget(60.0)
        >>> b.record_step(1.0); b.fits_next(with_eval=False)
        True
    """

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter() if start is None else start
        self.step_times: list[float] = []
        self.eval_s: float | None = None
        self.save_s: float | None = None

    def record_step(self, seconds: float) -> None:
        self.step_times.append(float(seconds))

    def record_eval(self, seconds: float) -> None:
        self.eval_s = float(seconds)

    def record_save(self, seconds: float) -> None:
        self.save_s = float(seconds)

    def left(self) -> float:
        """Seconds of budget left (negative once spent)."""
        return self.seconds - (time.perf_counter() - self.start)

    def step_estimate(self) -> float | None:
        """Median step time, the first step left out when later ones exist; None before any step."""
        times = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        return statistics.median(times) if times else None

    def closing_estimate(self, with_eval: bool) -> float:
        """Predicted seconds of the closing work: final checkpoint + ``final/`` (+ the final evaluation)."""
        step = self.step_estimate() or 0.0
        save = self.save_s if self.save_s is not None else step
        return 2.0 * save + ((self.eval_s or 0.0) if with_eval else 0.0)  # checkpoint and final/: about one save each

    def fits_next(self, with_eval: bool) -> bool:
        """Whether one more step and the closing work fit in what is left (True before any step was measured
        while budget is left)."""
        step = self.step_estimate()
        if step is None:
            return self.left() > self.closing_estimate(with_eval)
        return self.left() >= step + self.closing_estimate(with_eval)

    def steps_that_fit(self, done: int, with_eval: bool) -> int:
        """Total optimizer steps predicted to be done when the budget ends: ``done`` + the steps that fit."""
        step = self.step_estimate()
        if not step:
            return done
        return done + max(0, int((self.left() - self.closing_estimate(with_eval)) // step))

    def stop_reason(self, done: int, with_eval: bool) -> str:
        """The log line of a budget stop after ``done`` steps."""
        step = self.step_estimate() or 0.0
        return (f"time budget: {self.seconds:.0f} s budget, {self.seconds - self.left():.0f} s spent after {done} steps; "
                f"the next step (~{step:.1f} s) and the closing checkpoint/final (~{self.closing_estimate(with_eval):.1f} s) "
                "would not fit")
