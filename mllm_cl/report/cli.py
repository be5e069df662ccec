"""Print one table over run directories and write, per run, report.md, accuracy_matrix.csv and plots/.

The table gains a column of training samples and one of test rows skipped as
bad input (--data.on_bad_sample skip) when some run skipped any; report.md
lists them per task and stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "print one table over run directories; write report.md, accuracy_matrix.csv and plots per run"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (each holds a results.json)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--routing", action="store_true",
                   help="also rebuild each run's model and diagnose its routing: per task, layer and token kind, the "
                        "share of tokens whose top-1 is the task's own expert, and the method's task-choice accuracy; "
                        "for per-token routing over per-task experts, the separability diagnosis (separation ratio "
                        "per layer, answer-token accuracy under the gates and under own-expert routing) "
                        "(writes RUN/routing/stage_NN.{json,md} and RUN/plots/routing_stage_NN.png)")
    p.add_argument("--stage", type=int, default=None, help="with --routing: the stage to diagnose (default: the last)")
    p.add_argument("--limit", type=int, default=50, help="with --routing: test prompts per task (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    # heavy: torch; `mllm-cl --help` stays fast
    from mllm_cl.report.summary import load_results, markdown, row, table, write_csv

    rows = []
    for run_dir in map(Path, args.runs):
        try:
            results = load_results(run_dir)
        except (FileNotFoundError, ValueError) as e:
            print(f"mllm-cl report: {e}", file=sys.stderr)
            return 2
        rows.append(row(run_dir, results))
        write_csv(results, run_dir / "accuracy_matrix.csv")
        if not args.no_plots:
            from mllm_cl.report.plots import heatmap, task_curves  # heavy: matplotlib, unless --no-plots

            (run_dir / "plots").mkdir(exist_ok=True)
            heatmap(results, run_dir / "plots/accuracy_matrix.png")
            task_curves(results, run_dir / "plots/task_curves.png")
        (run_dir / "report.md").write_text(markdown(run_dir, results))
        if getattr(args, "routing", False):
            routing(run_dir, args)
    print(table(rows))
    return 0


def routing(run_dir: Path, args: argparse.Namespace) -> None:
    from mllm_cl.report import routing as diag  # heavy: torch and lightning, for --routing only
    from mllm_cl.system.restore import restore

    restored = restore(run_dir, getattr(args, "stage", None))
    result = diag.diagnose(restored, diag.load_predictions(run_dir, restored.stage), limit=getattr(args, "limit", 50))
    folder = run_dir / "routing"
    folder.mkdir(exist_ok=True)
    (folder / f"stage_{restored.stage:02d}.json").write_text(json.dumps(result, indent=1) + "\n")
    text = diag.markdown(result)
    (folder / f"stage_{restored.stage:02d}.md").write_text(text)
    if not args.no_plots:
        diag.heatmap(result, run_dir / "plots" / f"routing_stage_{restored.stage:02d}.png")
    print(text)
