"""Every method on both canonical synthetic sequences with one budget, each routed method next to its oracle.

    python examples/compare_methods/run.py --quick                # both sequences, canonical order, seed 0
    python examples/compare_methods/run.py --sequence coin        # one sequence
    python examples/compare_methods/run.py --sequence shapes --order ocr,count,classify,color --seed 1
    python examples/compare_methods/run.py --reproduce            # 3 sweeps per sequence (seeds 0, 1; reversed order)

The sequences (``SEQUENCES``): ``shapes``, the same-domain sequence of configs/experiments/synth.yaml
(four tasks over one kind of image), and ``coin``, the CoIN-shaped one of
configs/experiments/coin_like.yaml (eight tasks over six visual domains). Each method runs in its
own ``mllm-cl fit`` process into ``RUNS/SEQUENCE/ORDER-sSEED/METHOD``; a sweep interrupted and
started again resumes (finished runs are kept, a half-run one goes on after its last finished task).
Each routed method (``ORACLES``) then gets an oracle row, ``METHOD_oracle``: its own trained run
evaluated again with ``route_by: task_id`` (``mllm-cl evaluate``: every sample to its own task's
experts, no training; it leaks task identity: a bound, not a method), and routing-CL its routing
diagnostic (``mllm-cl report RUN --routing``). The comparison (``RUNS/comparison.md``; per sequence
``RUNS/SEQUENCE/mfn_vs_params.png`` and ``task_curves.png``) covers every sweep found: each metric's
mean and, over several sweeps, its range, the gap to the oracle, the routing's choice accuracy, the
general task's retention and the time against lora_ft's on the same sweep.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["zero_shot", "lora_ft", "moelora", "multitask", "individual", "routing", "same", "cmoe", "cram"]
#: Each routed method's oracle: the same run evaluated again with its experts chosen by the true task.
ORACLE_OPTIONS = ["--model.method.init_args.route_by", "task_id"]
ORACLES = ["routing", "same", "cmoe", "cram"]
#: The table's row order: each method, then its oracle row.
ROWS = [m for method in METHODS for m in (method, method + "_oracle")]
#: name -> experiment config (its data.order is the canonical order).
SEQUENCES = {"shapes": ROOT / "configs/experiments/synth.yaml", "coin": ROOT / "configs/experiments/coin_like.yaml"}
#: sequence -> method -> `mllm-cl fit` options that sequence needs: SAME's paper sets its pool to the number
#: of tasks (the config's 4 is the shapes sequence's; with 4 experts the coin sequence's last five tasks
#: would share one).
SEQUENCE_OPTIONS = {"coin": {"same": ["--model.method.init_args.num_experts", "8"]}}
SWEEP_NAME = re.compile(r"-s\d+$")


def canonical_order(experiment: Path) -> list[str]:
    order = ((yaml.safe_load(Path(experiment).read_text()) or {}).get("data") or {}).get("order")
    if not order:
        raise SystemExit(f"compare_methods: {experiment} has no data.order (the sequence's canonical order)")
    return list(order)


def sweeps_of(order: list[str], reproduce: bool, seed: int) -> list[tuple[list[str], int]]:
    """--reproduce: the canonical order with seeds 0 and 1, and the reversed order with seed 0."""
    return [(order, 0), (order, 1), (order[::-1], 0)] if reproduce else [(order, seed)]


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


def _cli(args: list[str], what: str) -> None:
    """One `mllm-cl` command in its own process (relative paths: from here)."""
    cmd = [sys.executable, "-m", "mllm_cl.cli", *args]
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compare_methods: {what} failed (status {done.returncode}); rerun: {' '.join(cmd)}")


def reevaluate(run_dir: Path, out: Path, options: list[str]) -> None:
    """``out``: the finished run evaluated again with evaluation-only options, no training (kept when it is there)."""
    t0 = time.time()
    _cli(["evaluate", str(run_dir), "--out", str(out), "--", *options], f"the evaluation {out} of {run_dir}")
    print(f"compare_methods: {out} done in {time.time() - t0:.0f} s", flush=True)


def oracle(run_dir: Path) -> None:
    """``RUN_oracle``: the finished run evaluated again with route_by task_id."""
    reevaluate(run_dir, run_dir.with_name(run_dir.name + "_oracle"), ORACLE_OPTIONS)


def diagnose(run_dir: Path) -> None:
    """The routing diagnostic of the last stage (``RUN/routing/stage_NN.json``), once."""
    import json

    stage = json.loads((run_dir / "results.json").read_text())["completed_tasks"]
    if not (run_dir / "routing" / f"stage_{stage:02d}.json").is_file():
        _cli(["report", str(run_dir), "--routing", "--no-plots"], f"the routing diagnostic of {run_dir}")


def run_sweep(runs: Path, order: list[str], seed: int, methods: list[str], experiment: Path, steps: int | None,
              fit_args: list[str]) -> None:
    folder = sweep_dir(runs, order, seed)
    own = SEQUENCE_OPTIONS.get(runs.name, {})  # runs: RUNS/SEQUENCE
    for method in methods:
        fit(folder / method, ROOT / "configs" / "methods" / f"{method}.yaml", order, seed, str(experiment), steps,
            own.get(method, []) + fit_args)
        if method in ORACLES:
            oracle(folder / method)
        if method == "routing":
            diagnose(folder / method)


def compare(runs: Path, sequences: list[str], results: Path | None = None, command: str = "") -> None:
    """RUNS/comparison.md: one table per sequence found under RUNS; the figures per sequence. With ``results``,
    the same tables and figures as that page's generated section ``comparison``."""
    from mllm_cl.report.compare import collect, figures, table

    parts, plots = [], []
    for name in sequences:
        sweeps = sorted(p for p in (runs / name).glob("*") if p.is_dir() and SWEEP_NAME.search(p.name))
        found = collect(sweeps)
        if not found:
            continue
        parts.append(f"## {name}\n\nSweeps: {', '.join(p.name for p in sweeps)}. Cells: mean over the sweeps "
                     f"(min–max where there are several).\n\n{table(found, order=ROWS)}\n")
        plots += figures(found, runs / name, title=name)
    if not parts:
        raise SystemExit(f"compare_methods: no finished runs under {runs}/{{{','.join(sequences)}}}")
    text = "\n".join(parts)
    (runs / "comparison.md").write_text(COLUMNS_NOTE + "\n" + text)
    print(text)
    print("figures: " + ", ".join(map(str, plots)))
    if results is not None:
        links = []
        for plot in plots:  # RUNS/SEQUENCE/NAME.png -> figures/compare_SEQUENCE_NAME.png beside the page
            target = results.parent / "figures" / f"compare_{plot.parent.name}_{plot.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plot, target)
            links.append(f"![{plot.parent.name}: {plot.stem.replace('_', ' ')}](figures/{target.name})")
        note = (COLUMNS_NOTE.replace("# Method comparison", "## Method comparison")
                .replace("docs/metrics.md", "[metrics](metrics.md)"))  # the page sits beside metrics.md
        publish(results, "comparison", command,
                note + "\n" + text.replace("\n## ", "\n### ").replace("## ", "### ", 1) + "\n" + "\n".join(links))


COLUMNS_NOTE = """# Method comparison

Columns: MFT, MFN, MAA, BWT as in docs/metrics.md; *gap to oracle*: MFN − the MFN of the same run routed by the
true task (`METHOD_oracle`, `mllm-cl evaluate ... route_by task_id`), per sweep; *routing*: how often the method's own
choice is the sample's task (a locator's, a prior's, a group's accuracy, mean over tasks) or, for token-level
routing, the share of tokens whose top-1 expert is their task's (image / instruction / answer tokens, from
`mllm-cl report RUN --routing`); *general*: the general task's token-F1 after the last task ÷ zero-shot;
*time*: training and evaluation seconds, and ÷ lora_ft's on the same sweep (an oracle row: its evaluation only).
"""


def publish(page: Path, section: str, command: str, body: str) -> None:
    """Write ``body`` as the generated section ``section`` of ``page``, opened by how it was produced."""
    from mllm_cl.report.results_page import provenance, write_section
    from mllm_cl.system.environment import environment

    write_section(page, section, provenance(command, environment()) + "\n\n" + body)
    print(f"compare_methods: wrote the section {section!r} of {page}")


def parse_common(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path, list[str]]:
    """The options run.py and ablations.py share; returns (args, the runs folder, the extra fit options)."""
    p.add_argument("--runs", default="runs/compare", help="folder for the sweeps and the tables (default: %(default)s)")
    p.add_argument("--experiment", action="append", default=[], metavar="SEQUENCE=CONFIG",
                   help="run SEQUENCE from this experiment config instead (its data.order is the canonical order); "
                        "defaults: " + ", ".join(f"{k}={v.relative_to(ROOT)}" for k, v in SEQUENCES.items()))
    p.add_argument("--compare-only", action="store_true", help="only write the table of the runs already there")
    p.add_argument("--results", type=Path, default=None, metavar="PAGE",
                   help="also write the tables into this results page (a generated section, opened by the command, "
                        "commit, date, machine and library versions; `make compare` gives docs/results.md)")
    p.add_argument("fit_args", nargs=argparse.REMAINDER,
                   help="after --: more `mllm-cl fit` options for every run (e.g. -- --data.benchmark DIR)")
    args = p.parse_args(argv)
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    args.experiments = dict(SEQUENCES)
    for item in args.experiment:
        name, sep, path = item.partition("=")
        if not sep or name not in SEQUENCES or not Path(path).is_file():
            raise SystemExit(f"compare_methods: --experiment {item}: give SEQUENCE=CONFIG with SEQUENCE one of "
                             f"{', '.join(SEQUENCES)} and CONFIG an existing file")
        args.experiments[name] = Path(path)
    return args, Path(args.runs), fit_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequence", choices=[*SEQUENCES, "both"], default="both",
                   help="which canonical sequence(s) to run (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="one sweep per sequence: its canonical order, seed 0 (the default, and the tables of "
                        "docs/results.md; over 3 h on 2 cores, most of it routing-CL's gate phase)")
    p.add_argument("--reproduce", action="store_true",
                   help="three sweeps per sequence: canonical order seeds 0 and 1, reversed order seed 0 (about "
                        "three times --quick)")
    p.add_argument("--order", default=None,
                   help="with one --sequence: this task order, comma-separated (default: the canonical one)")
    p.add_argument("--seed", type=int, default=0, help="run seed (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=METHODS, help="method configs to run (default: all)")
    p.add_argument("--steps", type=int, default=None, help="steps per task (default: the experiment's budget)")
    args, runs, fit_args = parse_common(p, argv)
    sequences = list(SEQUENCES) if args.sequence == "both" else [args.sequence]
    if args.order and (len(sequences) > 1 or args.reproduce or args.quick):
        p.error("--order goes with one --sequence, without --reproduce or --quick")
    if args.quick and args.reproduce:
        p.error("give --quick or --reproduce, not both")
    t0 = time.time()
    if not args.compare_only:
        for name in sequences:
            experiment = args.experiments[name]
            order = args.order.split(",") if args.order else canonical_order(experiment)
            for sweep_order, seed in sweeps_of(order, args.reproduce, 0 if args.quick else args.seed):
                run_sweep(runs / name, sweep_order, seed, args.methods, experiment, args.steps, fit_args)
    command = "python examples/compare_methods/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    compare(runs, list(SEQUENCES), args.results, command)
    print(f"compare_methods: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
