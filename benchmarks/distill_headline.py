"""The recovery headline of ``minitron distill``: held-out perplexity vs the teacher after a wall-clock budget.

Runs ``minitron distill --time-budget MINUTES`` (the built-in job: teacher SmolLM2-135M-Instruct, student
the teacher pruned to half its parameters in the same process, data the built-in texts) as a user would,
in a subprocess, then scores the teacher and the written student on the **whole** held-out split of each
built-in text (the CLI's own report uses 8 blocks of each) and, with ``--offdomain``, on general text from
outside the repo. Records the exact command, wall time,
the child's peak RSS, the thread count and the load average before and after (figures measured while
other jobs run mean nothing: run it alone).

Usage (results in benchmarks/results/distill_headline.{md,json})::

    python benchmarks/distill_headline.py --minutes 60 [--offdomain news.txt] [-- extra minitron distill flags]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, cpu_name, md_table, write_result  # noqa: E402


EVAL_SETS = {"manual": "builtin", "Commons": "builtin-commons", "Wikipedia": "builtin-wiki"}  # name -> data name (held-out split)


def held_out_ppl(model_dir: str | None, offdomain: str | None = None) -> dict[str, tuple[float, int]]:
    """Perplexity (and tokens) of the teacher (``None``) or a written student folder on each whole held-out
    split of the built-in texts, and on ``offdomain`` (a text file from outside the repo) if given."""
    import minitron
    from minitron.data import load_text_blocks
    from minitron.models import load_model, text_source

    teacher, tok = load_model("smollm2-135m")
    model = teacher if model_dir is None else load_model(model_dir)[0]
    sets = {k: text_source(v, "valid") for k, v in EVAL_SETS.items()}
    if offdomain:
        sets["off-domain"] = offdomain
    out = {}
    for name, data in sets.items():
        blocks = load_text_blocks(data, tok, 256)  # (n, 256)
        out[name] = (minitron.perplexity(model, blocks, 8), int(blocks.numel()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--work", default="out/bench-distill-headline")
    p.add_argument("--name", default="distill_headline")
    p.add_argument("--offdomain", default=None, help="a text file from outside the repo also scored "
                   "(benchmarks/offdomain_news.py writes one)")
    p.add_argument("extra", nargs="*", help="extra `minitron distill` flags (after --)")
    args = p.parse_args(argv)
    out_dir = Path(args.work)
    cmd = [sys.executable, "-m", "minitron.cli.distill", "--time-budget", f"{args.minutes:g}",
           "--output-dir", str(out_dir), "--no-progress", "--no-plot", *args.extra]
    if out_dir.exists():
        cmd.append("--no-resume")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return proc.returncode
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    rows = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in rows if r.get("split") == "train"]
    teacher_sets = held_out_ppl(None, args.offdomain)
    student_sets = held_out_ppl(str(out_dir / "final"), args.offdomain)
    (teacher_ppl, n_tok), (student_ppl, _) = teacher_sets["manual"], student_sets["manual"]
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    res = {
        "command": "minitron distill " + shlex.join(cmd[3:]), "cpu": cpu_name(), "cores": os.cpu_count(),
        "load_before": load_before, "load_after": load_after, "wall_s": round(wall, 1),
        "steps": train[-1]["step"] if train else 0, "tokens": train[-1]["tokens"] if train else 0,
        "teacher_ppl": teacher_ppl, "student_ppl": student_ppl, "ratio": student_ppl / teacher_ppl,
        "student_ppl_before_cli_blocks": report.get("student_ppl_before"), "eval_tokens": n_tok,
        "peak_rss_gb": round(peak_rss_gb, 2), "report": report, "offdomain": args.offdomain,
        "sets": {k: {"teacher_ppl": teacher_sets[k][0], "student_ppl": student_sets[k][0],
                     "ratio": student_sets[k][0] / teacher_sets[k][0], "tokens": teacher_sets[k][1]}
                 for k in teacher_sets},
    }
    Path(RESULTS).mkdir(exist_ok=True)
    (Path(RESULTS) / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    run = md_table(["steps", "tokens", "wall", "peak RSS", "load before/after"],
                   [[res["steps"], res["tokens"], f"{wall / 60:.1f} min", f"{peak_rss_gb:.2f} GB",
                     f"{load_before[0]:.2f} / {load_after[0]:.2f}"]], "rrrrl")
    table = md_table(["held-out text", "tokens", "teacher ppl", "student ppl", "x teacher"],
                     [[k, v["tokens"], f"{v['teacher_ppl']:.2f}", f"{v['student_ppl']:.2f}", f"{v['ratio']:.2f}"]
                      for k, v in res["sets"].items()], "lrrrr")
    where = (" and on a text from outside the repo (off-domain: news articles written by "
             "`benchmarks/offdomain_news.py`)" if args.offdomain else "")
    write_result(Path(RESULTS) / f"{args.name}.md",
                 f"`{res['command']}` on {res['cpu']} ({res['cores']} cores). Perplexity on the whole held-out "
                 f"split of each built-in text (never trained on){where}.\n\n{run}\n\n{table}\n")
    print(json.dumps({k: res[k] for k in ("teacher_ppl", "student_ppl", "ratio", "steps", "tokens", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
