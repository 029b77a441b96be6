"""Small-scale reproduction of the Minitron papers' main claims on the built-in model and text.

Every student has about 57% of the teacher's parameters and gets the same retraining budget
(same steps, batch, sequence length, learning-rate schedule), then is evaluated on the held-out
split the teacher never saw:

1. width pruning vs depth pruning (both activation importance, both KD-retrained);
2. activation importance vs random channels of the same shape (both KD-retrained);
3. KD-only retraining vs CE-only retraining of the same pruned model;
4. the pruned + KD-retrained model vs a same-size model trained from scratch with the same
   token budget (CE on the data, same schedule, higher peak LR as fits a fresh model).

Writes a markdown table and a plot of held-out loss vs retraining step:

    python benchmarks/evidence.py [--steps 150] [--out-dir benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import minitron
from minitron.models import load_model
from minitron.data import builtin_text, load_text_blocks


def retrain(student, teacher, train, valid, tok, steps: int, lr: float, kd: bool, batch_size: int, seq_len: int):
    """Retrain ``student`` (KD-only or CE-only); returns (student, [(step, held-out loss), ...])."""
    with tempfile.TemporaryDirectory() as run_dir:
        config = minitron.DistillConfig(
            steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10), seq_len=seq_len,
            batch_size=batch_size, output_dir=run_dir, save_every=0, eval_every=max(1, steps // 6),
            kd_weight=1.0 if kd else 0.0, clm_weight=0.0 if kd else 1.0, progress=False, plot=False, resume=False,
        )
        student = minitron.distill(student, teacher, train, valid, config=config, tokenizer=tok)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["lm_loss"]) for r in rows if r.get("split") == "eval"]
    return student, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--scratch-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    teacher, tok = load_model("builtin-tiny")
    train = load_text_blocks([builtin_text("train")], tok, args.seq_len)
    valid = load_text_blocks([builtin_text("valid")], tok, args.seq_len)
    teacher_loss = minitron.lm_loss(teacher, valid)
    scores = minitron.collect_importance(teacher, train[:256], minitron.ImportanceConfig(head_output=True),
                                           progress=False)

    depth_target = minitron.Target(num_hidden_layers=teacher.config.num_hidden_layers // 2)
    budget = minitron.target_parameters(teacher, depth_target)
    width_target = minitron.target_for_budget(teacher, float(budget))  # same size as the depth student

    def pruned(target, method="activation"):
        # the paper's criteria, as recorded in results/evidence_builtin.*
        return minitron.prune(teacher, target=target, scores=scores, method=method, seed=0, verbose=False,
                              depth_metric="bi", norm_rescale=False)

    def scratch():
        torch.manual_seed(0)
        return type(teacher)(width_target.config_for(teacher.config))

    runs = [  # (name, student factory, KD?, lr)
        ("width, importance, KD", lambda: pruned(width_target), True, args.lr),
        ("depth, importance (BI), KD", lambda: pruned(depth_target), True, args.lr),
        ("width, random channels, KD", lambda: pruned(width_target, "random"), True, args.lr),
        ("width, importance, CE only", lambda: pruned(width_target), False, args.lr),
        ("same size from scratch, CE", scratch, False, args.scratch_lr),
    ]
    results = []
    for name, make, kd, lr in runs:
        student = make()
        before = minitron.lm_loss(student, valid)
        student, curve = retrain(student, teacher, train, valid, tok, args.steps, lr, kd, args.batch_size, args.seq_len)
        results.append({"run": name, "params": minitron.count_parameters(student), "loss_before": before,
                        "loss_after": curve[-1][1], "curve": curve})
        print(f"{name}: {before:.3f} -> {curve[-1][1]:.3f}", flush=True)

    tokens = args.steps * args.batch_size * args.seq_len
    lines = [
        f"Teacher: built-in model, {minitron.count_parameters(teacher) / 1e6:.2f}M params, held-out LM loss "
        f"{teacher_loss:.3f} (ppl {torch.tensor(teacher_loss).exp():.1f}). Every student ~{budget / 1e6:.2f}M params, "
        f"retrained {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens / 1e6:.2f}M tokens "
        f"(lr {args.lr}, from scratch {args.scratch_lr}; cosine, 10% warmup). Held-out LM loss (lower is better). "
        f"({time.time() - start:.0f} s on CPU)",
        "",
        "| run | params | loss after pruning | loss after retraining | ppl after retraining |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['loss_before']:.3f} | {r['loss_after']:.3f} | "
                     f"{torch.tensor(r['loss_after']).exp():.1f} |")
    table = "\n".join(lines)
    print(table)
    (out_dir / "evidence_builtin.md").write_text(table + "\n")
    (out_dir / "evidence_builtin.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, marker="o", ms=3, label=r["run"])
    ax.axhline(teacher_loss, color="black", ls="--", lw=1, label="teacher (unpruned)")
    ax.set_xlabel("retraining step")
    ax.set_ylabel("held-out LM loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], teacher_loss + 4))
    ax.set_title("Built-in model at ~57% size: retraining recovery")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "evidence_builtin.png", dpi=110)


if __name__ == "__main__":
    main()
