"""``mllm-cl quickstart``: the framework doing its job on a CPU in a few minutes.

Runs the canonical synthetic sequence (configs/experiments/synth.yaml) on the
pretrained tiny base twice, with ``lora_ft`` (one shared LoRA: it forgets)
and ``cmoe`` (LLaVA-CMoE: experts grown per task, chosen by a task locator:
it keeps its tasks), then prints both accuracy matrices, one line saying what
they show, and writes reports and plots under ``runs/``. ``--methods`` runs
any method configs instead.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mllm_cl.report.cli import run as report

HELP = "run the canonical synthetic sequence with lora_ft and cmoe and compare them (CPU, minutes)"
#: Per method, options that keep the quickstart to minutes. routing's own config trains each gate as
#: PHATGOOSE does (100 steps of 32 x 32 samples: about ten times its expert phase on a CPU); with
#: ``--methods routing`` the gates train 100 steps of one batch at the sequence's lr.
QUICK = {"routing": ["--model.method.init_args.gate_batch", "null", "--model.method.init_args.gate_lr", "null",
                     "--model.method.init_args.gate_warmup", "null"]}
ROOT = Path(__file__).resolve().parents[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=["lora_ft", "cmoe"],
                   help="method configs under configs/methods/ to run (default: %(default)s)")
    p.add_argument("--experiment", default=str(ROOT / "configs/experiments/synth.yaml"),
                   help="experiment config (default: the canonical synthetic sequence)")
    p.add_argument("--runs", default="runs", help="folder for the run directories (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="override steps per task and cap every phase at it (default: the experiment's budget)")


def _matrix_lines(results: dict) -> list[str]:
    from mllm_cl.report.summary import matrix_rows  # heavy: torch; `mllm-cl --help` stays fast

    names = results["order"]
    width = max(len(n) for n in names) + 1
    lines = [" " * 22 + "".join(n[:width].rjust(width) for n in names)]
    for label, scores in matrix_rows(results):
        lines.append(label[:21].ljust(22) + "".join(("–" if s is None else f"{s:.0f}").rjust(width) for s in scores))
    return lines


#: Below this BWT (points) a method counts as forgetting its earlier tasks in the summary line.
FORGETS_BELOW = -5.0


def verdict(results: list[dict]) -> str:
    """One line on what the matrices show: which methods forget their earlier tasks and which keep them."""
    parts = []
    for r in results:
        metrics = r.get("metrics") or {}
        mfn, bwt = metrics.get("MFN"), metrics.get("BWT")
        if mfn is None or bwt is None:
            parts.append(f"{r['method']} has no BWT (a single stage)" if mfn is not None
                         else f"{r['method']} has no final row")
            continue
        what = "forgets its earlier tasks" if bwt < FORGETS_BELOW else "keeps its tasks"
        parts.append(f"{r['method']} {what} (MFN {mfn:.1f}, BWT {bwt:+.1f})")
    return "; ".join(parts) + "."


def run(args: argparse.Namespace) -> int:
    from mllm_cl.fit import main as fit_main  # heavy: lightning; `mllm-cl --help` stays fast
    from mllm_cl.report.summary import load_results  # heavy: torch

    t0 = time.time()
    run_dirs = []
    for method in args.methods:
        config = ROOT / "configs" / "methods" / f"{method}.yaml"
        if not config.exists():
            raise SystemExit(f"mllm-cl quickstart: no method config {config}")
        run_dir = Path(args.runs) / f"quickstart-{method}"
        extra = [] if args.steps is None else ["--model.steps_per_task", str(args.steps),
                                               "--model.max_phase_steps", str(args.steps)]
        quick = QUICK.get(method, [])
        print(f"\n=== {method} ===" + (f" (quickstart budget: {' '.join(quick)})" if quick else ""))
        fit_main(["--config", args.experiment, "--config", str(config), "--trainer.default_root_dir", str(run_dir),
                  "--trainer.enable_progress_bar", "true", *quick, *extra])
        run_dirs.append(run_dir)
    print()
    report(argparse.Namespace(runs=[str(d) for d in run_dirs], no_plots=False))
    results = [load_results(d) for d in run_dirs]
    blocks = [[f"{r['method']}:"] + _matrix_lines(r) for r in results]
    print()
    for lines in zip(*blocks, strict=False):
        print("    ".join(line.ljust(len(blocks[0][1])) for line in lines))
    print("\n" + verdict(results))
    print(f"\nquickstart finished in {time.time() - t0:.0f}s; reports: "
          + ", ".join(str(d / "report.md") for d in run_dirs))
    return 0
