"""Pruning quality on a real model: the paper's criteria vs minitron's defaults vs random selection.

SmolLM2-135M-Instruct (``minitron.load_model("smollm2-135m")``), pruned without retraining, one
axis at a time and to half its parameters (issue #11). One calibration on the training split of
the built-in English text serves every row; perplexity is measured on a fixed subset of the
held-out split (evenly spaced blocks; the model's calibration never saw them). Random rows prune
to the same shape with uniformly random channels / neurons / heads / layers (``--seeds`` seeds).

Everything expensive is cached under ``--cache`` (the importance statistics, every row's
perplexity), so the script resumes after an interruption and ``--axes`` re-runs one axis:

    python benchmarks/prune_quality_real.py                      # all axes, ~1-2 h on 2 busy CPU cores
    python benchmarks/prune_quality_real.py --axes heads,depth   # a subset (cached rows are reused)

Writes ``benchmarks/results/prune_quality_real.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import minitron
from minitron.pruning.budget import budget_candidates, choose_budget_target
from minitron.data import builtin_text, load_text_blocks
from minitron.importance.ablation import greedy_layer_removal
from minitron.pruning import apply_plan, norm_scales, random_plan

AXES = ("ffn", "hidden", "heads", "depth", "params")
RESULTS = Path(__file__).parent / "results"
# Every importance row names its options in full, so that a change of minitron's defaults cannot
# silently change what an old-criteria row measures.
PAPER = dict(depth_metric="bi", head_metric="input", norm_rescale=False, head_residual=False)
NEW = dict(depth_metric="ppl", head_metric="output", norm_rescale=True, head_residual=True)


@dataclass
class Row:
    """One pruned model of the table.

    Args:
        axis: which axis (``ffn``, ``hidden``, ``heads``, ``depth``, ``params``).
        label: the criterion / option in words.
        key: cache key (unique per row).
        shape: hidden / FFN / heads / layers after pruning.
        params: parameters after pruning.
        ppl: held-out perplexity (importance rows) or per-seed perplexities (random rows).
        default: True for the row of minitron's default criteria on this axis.
        paper: True for the row of the paper's (and minitron's old) criteria.
    """

    axis: str
    label: str
    key: str
    shape: str = ""
    params: int = 0
    ppl: list[float] = field(default_factory=list)
    default: bool = False
    paper: bool = False

    @property
    def mean(self) -> float:
        return statistics.mean(self.ppl)


def shape_of(model) -> str:
    c = model.config
    return f"{c.hidden_size} / {c.intermediate_size} / {c.num_attention_heads} / {c.num_hidden_layers}"


class Bench:
    """Model, data, scores and a perplexity cache shared by every row."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.model, tok = minitron.load_model(args.model)
        self.model.eval()
        self.calib = load_text_blocks([builtin_text("train")], tok, args.seq_len)[: args.calib_blocks]
        valid = load_text_blocks([builtin_text("valid")], tok, args.seq_len)
        n = min(args.eval_blocks, valid.shape[0])
        self.valid_total = valid.shape[0]
        self.eval_index = torch.linspace(0, valid.shape[0] - 1, n).round().long()  # evenly spaced, fixed
        self.valid = valid[self.eval_index]
        self.config = minitron.ImportanceConfig(batch_size=args.batch_size, depth_ppl=True, head_output=True,
                                                ppl_max_blocks=args.ppl_blocks, head_loss=True,
                                                head_loss_blocks=args.head_loss_blocks)
        self.scores = self.calibrate("scores", self.config)
        self.ppl_cache_path = self.cache / "ppl.json"
        self.ppl_cache: dict[str, dict] = json.loads(self.ppl_cache_path.read_text()) if self.ppl_cache_path.exists() else {}

    def calibrate(self, name: str, config: minitron.ImportanceConfig) -> minitron.ImportanceScores:
        path = self.cache / f"{name}-{self.args.calib_blocks}x{self.args.seq_len}.safetensors"
        if path.exists():
            return minitron.ImportanceScores.load(path)
        start = time.time()
        scores = minitron.collect_importance(self.model, self.calib, config)
        print(f"calibration {name}: {time.time() - start:.0f} s")
        scores.save(path)
        return scores

    def measure(self, key: str, build: Callable[[], torch.nn.Module]) -> dict:
        """Perplexity, shape and size of ``build()`` (cached by ``key``)."""
        if key not in self.ppl_cache:
            start = time.time()
            pruned = build()
            ppl = minitron.perplexity(pruned, self.valid, self.args.batch_size)
            self.ppl_cache[key] = {"ppl": ppl, "shape": shape_of(pruned), "params": minitron.count_parameters(pruned)}
            self.ppl_cache_path.write_text(json.dumps(self.ppl_cache, indent=1))
            print(f"  {key}: ppl {ppl:.2f} ({time.time() - start:.0f} s)", flush=True)
        return self.ppl_cache[key]

    def row(self, axis: str, label: str, key: str, target: minitron.Target, default: bool = False,
            paper: bool = False, **options) -> Row:
        """An importance row: ``minitron.prune`` with ``options`` from the shared scores."""
        r = self.measure(key, lambda: minitron.prune(self.model, target=target, scores=self.scores, verbose=False,
                                                     **options))
        return Row(axis, label, key, r["shape"], r["params"], [r["ppl"]], default, paper)

    def random(self, axis: str, target: minitron.Target, rescale: bool = False, residual: bool = False) -> Row:
        """Random selection of the same shape, one perplexity per seed (optionally with the norm
        rescale / head residual applied to the random selection)."""
        ppls, last = [], {}
        extras = "".join(name for name, on in (("+rescale", rescale), ("+residual", residual)) if on)
        for seed in range(self.args.seeds):
            def build(seed=seed):
                plan = random_plan(self.model.config, target, seed)
                plan.head_residual = residual
                if rescale:
                    plan.norm_scale = norm_scales(self.scores, plan.hidden, list(range(self.model.config.num_hidden_layers)))
                return apply_plan(self.model, plan)
            last = self.measure(f"{axis}.random{extras}.{seed}", build)
            ppls.append(last["ppl"])
        label = "random selection" + "".join(f" + {name}" for name, on in (("norm rescale", rescale),
                                                                          ("head residual", residual)) if on)
        return Row(axis, f"{label} ({self.args.seeds} seeds)", f"{axis}.random{extras}", last["shape"], last["params"], ppls)

    def budget_choice(self) -> tuple[minitron.Target, list[dict]]:
        """The shape ``prune(params=0.5)`` picks by measurement (cached with the scores)."""
        path = self.cache / "budget.json"
        if path.exists():
            saved = json.loads(path.read_text())
            return minitron.Target(**saved["target"]), saved["candidates"]
        target, candidates = choose_budget_target(self.model, 0.5, self.scores, self.calib[: self.args.budget_blocks],
                                                  batch_size=self.args.batch_size, plan_options=NEW)
        saved = {"target": asdict(target), "candidates": [c.as_dict() for c in candidates]}
        path.write_text(json.dumps(saved, indent=1))
        return target, saved["candidates"]


# ---- the axes -------------------------------------------------------------------------------------


def ffn_rows(b: Bench) -> list[Row]:
    t = minitron.Target(intermediate_size=b.model.config.intermediate_size // 2)
    return [b.row("ffn", "activation importance (paper = default)", "ffn.importance", t, default=True, paper=True, **PAPER),
            b.random("ffn", t)]


def hidden_rows(b: Bench) -> list[Row]:
    t = minitron.Target(hidden_size=b.args.hidden)
    return [b.row("hidden", "activation importance (paper)", "hidden.paper", t, paper=True, **PAPER),
            b.row("hidden", "activation importance + norm rescale", "hidden.rescale", t, default=True, **NEW),
            b.random("hidden", t), b.random("hidden", t, rescale=True)]


def heads_rows(b: Bench) -> list[Row]:
    c = b.model.config
    t = minitron.Target(num_attention_heads=c.num_attention_heads * 2 // 3)
    plain = {**NEW, "head_residual": False}
    rows = [b.row("heads", "o_proj input, L2 over head_dim (paper)", "heads.input", t, paper=True, **PAPER),
            b.row("heads", "contribution after o_proj", "heads.output", t, **plain),
            b.row("heads", "LM loss with the head dropped", "heads.loss", t, **{**plain, "head_metric": "loss"}),
            b.row("heads", "paper + head residual", "heads.input+residual", t, **{**PAPER, "head_residual": True}),
            b.row("heads", "after o_proj + head residual", "heads.output+residual", t, default=True, **NEW),
            b.row("heads", "LM loss + head residual", "heads.loss+residual", t, **{**NEW, "head_metric": "loss"}),
            b.random("heads", t), b.random("heads", t, residual=True)]
    if b.args.sink_tokens:  # the same criteria with the first tokens (attention sinks) left out
        sink = b.calibrate(f"scores-sink{b.args.sink_tokens}", minitron.ImportanceConfig(
            batch_size=b.args.batch_size, sink_tokens=b.args.sink_tokens, head_output=True))
        for metric in ("input", "output"):
            plans = [minitron.make_plan(s, t, c, head_metric=metric).heads for s in (b.scores, sink)]
            changed = sum(int(not torch.equal(plans[0][l], plans[1][l])) for l in plans[0])
            label = f"{metric}, first {b.args.sink_tokens} tokens excluded: {changed} of {c.num_hidden_layers} layers change"
            r = b.measure(f"heads.{metric}.sink{b.args.sink_tokens}", lambda m=metric: minitron.prune(
                b.model, target=t, scores=sink, verbose=False, **{**NEW, "head_metric": m}))
            rows.append(Row("heads", label, f"heads.{metric}.sink", r["shape"], r["params"], [r["ppl"]]))
    return rows


def depth_rows(b: Bench) -> list[Row]:
    n = b.model.config.num_hidden_layers
    t = minitron.Target(num_hidden_layers=n // 2)
    rows = [b.row("depth", "Block Importance (paper)", "depth.bi", t, paper=True, **PAPER),
            b.row("depth", "perplexity (LM loss with the layer dropped)", "depth.ppl", t, default=True, **NEW),
            b.row("depth", "Block Importance, contiguous block", "depth.bi.contiguous", t, depth_mode="contiguous", **PAPER),
            b.row("depth", "perplexity, contiguous block", "depth.ppl.contiguous", t, depth_mode="contiguous", **NEW),
            b.random("depth", t)]
    if b.args.iter_blocks:  # iterative removal vs one-shot, both scored on the same (few) calibration blocks
        drop = n - n // 2
        for step in (drop, b.args.iter_step):
            key = f"depth.ppl.iter{step}.{b.args.iter_blocks}"
            path = b.cache / f"{key}.json"
            if not path.exists():
                start = time.time()
                order = greedy_layer_removal(b.model, b.calib[: b.args.iter_blocks], drop, step, b.args.batch_size)
                path.write_text(json.dumps({"removed": order, "seconds": round(time.time() - start)}))
            removed = json.loads(path.read_text())["removed"]
            keep = torch.tensor(sorted(set(range(n)) - set(removed)))
            r = b.measure(key, lambda keep=keep: apply_plan(b.model, minitron.PrunePlan(layers=keep)))
            what = "one-shot" if step >= drop else f"iterative, {step} layers per round"
            rows.append(Row("depth", f"perplexity, {what} (scored on {b.args.iter_blocks} blocks)", key, r["shape"],
                            r["params"], [r["ppl"]]))
    return rows


def params_rows(b: Bench) -> list[Row]:
    old = minitron.target_for_budget(b.model, 0.5)
    chosen, candidates = b.budget_choice()
    rows = [b.row("params", "fixed width rule, paper criteria", "params.fixed.paper", old, paper=True, **PAPER),
            b.row("params", "fixed width rule, new criteria", "params.fixed.new", old, **NEW),
            b.row("params", f"measured shape ({len(candidates)} candidates), new criteria", "params.measured", chosen,
                  default=True, **NEW),
            b.random("params", chosen)]
    # the axes the candidates leave alone: the measured hidden size with heads or layers cut too, FFN refilled
    c = b.model.config
    fraction = [chosen.hidden_size / c.hidden_size]
    for what, extra in (("heads", dict(num_attention_heads=c.num_attention_heads * 2 // 3)),
                        ("layers", dict(num_hidden_layers=c.num_hidden_layers * 7 // 8))):
        alt = budget_candidates(b.model, 0.5, fraction, **extra)[0].target
        rows.append(b.row("params", f"measured hidden, {what} cut too, FFN refilled", f"params.alt.{what}", alt, **NEW))
    return rows


ROWS = {"ffn": ffn_rows, "hidden": hidden_rows, "heads": heads_rows, "depth": depth_rows, "params": params_rows}


# ---- report ---------------------------------------------------------------------------------------


def markdown(b: Bench, rows: list[Row], base: dict, seconds: float) -> str:
    a = b.args
    lines = [
        f"SmolLM2-135M-Instruct (`minitron.load_model(\"{a.model}\")`), no retraining. Held-out perplexity on "
        f"{len(b.eval_index)} of the {b.valid_total} held-out blocks of {a.seq_len} tokens of the built-in text "
        f"(evenly spaced: {b.eval_index.tolist()}); calibration: {a.calib_blocks} x {a.seq_len} tokens of the training "
        f"split; layer-drop losses on the first {a.ppl_blocks} of those blocks, head-drop losses on the first "
        f"{a.head_loss_blocks}. Random = same shape, uniformly random selection, {a.seeds} seeds: mean (min - max). "
        f"Unpruned: {base['ppl']:.2f}. ({seconds / 60:.0f} min of this run, cached rows not counted)",
        "",
        "| axis | criterion | hidden / FFN / heads / layers | params | held-out ppl | |",
        "|---|---|---|---|---:|---|",
    ]
    for r in rows:
        if len(r.ppl) > 1:
            value = f"{r.mean:,.1f} ({min(r.ppl):,.1f} - {max(r.ppl):,.1f})"
        else:
            value = f"{r.ppl[0]:,.1f}"
        tags = ", ".join(t for t, on in (("default", r.default), ("paper", r.paper)) if on)
        lines.append(f"| {r.axis} | {r.label} | {r.shape} | {r.params / 1e6:.1f}M | {value} | {tags} |")
    lines += ["", "Default criteria vs the mean of random selection (the issue's acceptance test):", ""]
    for axis in dict.fromkeys(r.axis for r in rows):
        default = next(r for r in rows if r.axis == axis and r.default)
        for rand in (r for r in rows if r.axis == axis and r.key.startswith(f"{axis}.random")):
            verdict = "beats" if default.mean < rand.mean else "DOES NOT beat"
            worst = "every seed" if default.mean < min(rand.ppl) else "not every seed"
            lines.append(f"- {axis}: {default.ppl[0]:,.1f} {verdict} {rand.label} {rand.mean:,.1f} "
                         f"({rand.mean / default.ppl[0]:,.1f}x; {worst})")
    return "\n".join(lines)


def budget_markdown(candidates: list[dict]) -> str:
    lines = ["", "`prune(params=0.5)` candidates (LM loss on calibration blocks right after pruning; lowest wins):", "",
             "| hidden | FFN | heads | layers | params | calibration loss |", "|---:|---:|---:|---:|---:|---:|"]
    for c in candidates:
        t = c["target"]
        lines.append(f"| {t['hidden_size']} | {t['intermediate_size']} | {t['num_attention_heads']} | "
                     f"{t['num_hidden_layers']} | {c['params'] / 1e6:.2f}M | {c['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--axes", default=",".join(AXES), help=f"comma-separated subset of {', '.join(AXES)}")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks evaluated (evenly spaced)")
    parser.add_argument("--ppl-blocks", type=int, default=16, help="calibration blocks of the layer-drop losses")
    parser.add_argument("--head-loss-blocks", type=int, default=4, help="calibration blocks of the head-drop losses")
    parser.add_argument("--budget-blocks", type=int, default=8, help="calibration blocks scoring params=0.5 shapes")
    parser.add_argument("--hidden", type=int, default=378, help="hidden size of the hidden-only row (issue #11: 378)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="also score heads without the first N tokens (0: skip)")
    parser.add_argument("--iter-blocks", type=int, default=4, help="calibration blocks of the iterative depth "
                        "comparison (0: skip)")
    parser.add_argument("--iter-step", type=int, default=3, help="layers removed per round, iterative depth")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache", default=".benchmarks/prune_quality_real")
    parser.add_argument("--out", default=str(RESULTS / "prune_quality_real"), help="writes OUT.md and OUT.json")
    args = parser.parse_args()
    axes = [a for a in args.axes.split(",") if a]
    unknown = set(axes) - set(AXES)
    if unknown:
        parser.error(f"unknown axes {sorted(unknown)}; choose from {', '.join(AXES)}")
    torch.manual_seed(0)
    start = time.time()
    b = Bench(args)
    base = b.measure("original", lambda: b.model)
    rows = [row for axis in AXES if axis in axes for row in ROWS[axis](b)]
    text = markdown(b, rows, base, time.time() - start)
    if "params" in axes:
        text += "\n" + budget_markdown(b.budget_choice()[1])
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps({
        "model": args.model, "unpruned_ppl": base["ppl"], "eval_blocks": b.eval_index.tolist(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")},
        "rows": [{**asdict(r), "mean": r.mean} for r in rows],
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
