"""Every method on the canonical synthetic sequence with one budget, then one table and two figures.

    python examples/compare_methods/run.py                        # one sweep: the canonical order, seed 0
    python examples/compare_methods/run.py --order ocr,count,classify,color --seed 1
    python examples/compare_methods/run.py --reproduce            # the README's table: 3 sweeps + comparison

Each method runs in its own ``mllm-cl fit`` process into ``RUNS/ORDER-sSEED/METHOD``; a sweep
interrupted and started again resumes (finished runs are kept, a half-run one goes on after its
last finished task). The comparison (``RUNS/comparison.md``, ``RUNS/mfn_vs_params.png``,
``RUNS/task_curves.png``) covers every sweep found under RUNS: each metric's mean and, over
several sweeps (task orders, seeds), its range.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["zero_shot", "lora_ft", "moelora", "multitask", "individual", "routing", "same", "cmoe", "cram"]
CANONICAL = ["color", "classify", "count", "ocr"]
#: --reproduce: the canonical order with seeds 0 and 1, and the reversed order with seed 0.
SWEEPS = [(CANONICAL, 0), (CANONICAL, 1), (CANONICAL[::-1], 0)]
SWEEP_NAME = re.compile(r"-s\d+$")


def sweep_dir(runs: Path, order: list[str], seed: int) -> Path:
    return runs / f"{'-'.join(order)}-s{seed}"


def fit(run_dir: Path, config: Path, order: list[str], seed: int, experiment: str, steps: int | None,
        fit_args: list[str]) -> None:
    """One `mllm-cl fit` process into run_dir (a finished run is kept; a half-run one resumes)."""
    if not config.exists():
        raise SystemExit(f"compare_methods: no method config {config}")
    cmd = [sys.executable, "-m", "mllm_cl.cli", "fit", "--config", experiment, "--config", str(config),
           "--trainer.default_root_dir", str(run_dir), "--seed_everything", str(seed),
           "--data.order", "[" + ", ".join(order) + "]", "--trainer.enable_progress_bar", "false"]
    if steps is not None:
        cmd += ["--model.steps_per_task", str(steps)]
    cmd += fit_args
    t0 = time.time()
    print(f"compare_methods: {run_dir} ...", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=False)  # relative paths: from here
    if done.returncode != 0:
        raise SystemExit(f"compare_methods: {run_dir} failed (status {done.returncode}); rerun: {' '.join(cmd)}")
    print(f"compare_methods: {run_dir} done in {time.time() - t0:.0f} s", flush=True)


def run_sweep(runs: Path, order: list[str], seed: int, methods: list[str], experiment: str, steps: int | None,
              fit_args: list[str]) -> None:
    folder = sweep_dir(runs, order, seed)
    for method in methods:
        fit(folder / method, ROOT / "configs" / "methods" / f"{method}.yaml", order, seed, experiment, steps, fit_args)


def compare(runs: Path) -> None:
    from mllm_cl.report.compare import collect, figures, table

    sweeps = sorted(p for p in runs.iterdir() if p.is_dir() and SWEEP_NAME.search(p.name))  # not ablations/
    found = collect(sweeps)
    if not found:
        raise SystemExit(f"compare_methods: no finished runs under {runs}")
    text = table(found, order=METHODS)
    plots = figures(found, runs)
    header = (f"Sweeps: {', '.join(p.name for p in sweeps)}. Cells: mean over the sweeps "
              "(min–max where there are several).\n\n")
    (runs / "comparison.md").write_text(header + text + "\n")
    print(header + text)
    print("figures: " + ", ".join(map(str, plots)))


def parse_common(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path, list[str]]:
    """The options run.py and ablations.py share; returns (args, the runs folder, the extra fit options)."""
    p.add_argument("--runs", default="runs/compare", help="folder for the sweeps and the tables")
    p.add_argument("--experiment", default=str(ROOT / "configs/experiments/synth.yaml"),
                   help="experiment config (default: the canonical synthetic sequence)")
    p.add_argument("--compare-only", action="store_true", help="only write the table of the runs already there")
    p.add_argument("fit_args", nargs=argparse.REMAINDER,
                   help="after --: more `mllm-cl fit` options for every run (e.g. -- --data.benchmark DIR)")
    args = p.parse_args(argv)
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    return args, Path(args.runs), fit_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--order", default=",".join(CANONICAL),
                   help="task order, comma-separated (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=METHODS, help="method configs to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="steps per task (default: the experiment's budget)")
    p.add_argument("--reproduce", action="store_true",
                   help="run the three sweeps of the README's table (canonical order seeds 0 and 1, reversed "
                        "order seed 0), ignoring --order and --seed")
    args, runs, fit_args = parse_common(p, argv)
    t0 = time.time()
    if not args.compare_only:
        for order, seed in SWEEPS if args.reproduce else [(args.order.split(","), args.seed)]:
            run_sweep(runs, order, seed, args.methods, args.experiment, args.steps, fit_args)
    compare(runs)
    print(f"compare_methods: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
