"""Routing-based CL against how far apart its tasks' tokens are: a sweep of the synthetic benchmark's two knobs.

    python examples/routing_separability/run.py --quick            # 3 settings, the fast gate budget
    python examples/routing_separability/run.py                    # 2 x 4 settings
    python examples/routing_separability/run.py --tints 0 0.5 1 --instruction-first true
    python examples/routing_separability/run.py --compare-only     # only the table and figure of RUNS

On the shapes sequence routing-based CL's gates pick the token's own task expert for about 30% of tokens:
a layer's standardized inputs carry little of the task (separation ratio 0.07-0.13), because the image
comes before the instruction (under causal attention its tokens cannot see it) and every task draws the
same kind of image. Each setting here regenerates the sequence's data with two knobs of
``mllm-cl data synth`` (docs/synthetic.md): ``instruction_first`` (the instruction before the image, so
every prompt token after it sees the task's words) and ``tint`` (each task's images blended with a colour
of its own, weight S). For each setting it trains ``routing`` (``configs/methods/routing.yaml``) into
``RUNS/SETTING/routing``, evaluates that run again routed by the true task (``RUNS/SETTING/routing_oracle``,
``mllm-cl evaluate ... route_by task_id``), diagnoses its routing (``mllm-cl report RUN --routing``) and
then writes ``RUNS/separability.md`` (one row per setting: the separation ratio, the gates' own top-1
share, MFN, the oracle's MFN and the gap) and ``RUNS/separability.png`` (the gap to the oracle against
the separation ratio, one point per setting).

A sweep interrupted and started again resumes: finished runs, evaluations and diagnoses are kept, and a
half-run fit goes on after its last finished task. ``RUNS/sweep.json`` records the options that change what
a run is (experiment, gate budget, steps, sizes, seed, extra fit options); a later call into the same RUNS
with other ones is refused, so that one table never mixes budgets. Settings may be added to a RUNS folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "configs" / "experiments" / "synth.yaml"
METHOD = ROOT / "configs" / "methods" / "routing.yaml"
GATE = "--model.method.init_args."
#: The gate phase's budget: PHATGOOSE's (the config's: 100 steps of 1024 samples at 5e-3) or the sequence's own
#: samples per step, learning rate and schedule (examples/compare_methods/ablations.py's routing_gate_fast).
GATE_BUDGETS = {"phatgoose": [], "fast": [GATE + "gate_batch", "null", GATE + "gate_lr", "null",
                                          GATE + "gate_warmup", "null"]}
ORACLE_OPTIONS = [GATE + "route_by", "task_id"]
FIRSTS = (False, True)
TINTS = (0.0, 0.25, 0.5, 0.75)
#: --quick: the shipped layout, the instruction first, and the instruction first with tinted images.
QUICK = ((False, 0.0), (True, 0.0), (True, 0.5))
#: RUNS/separability.md and .png (the name kept apart from its suffix: a file in a run folder, not a document)
OUTPUT = "separability"
SETTING = re.compile(r"^(image|instruction)_first-tint(\d+(?:\.\d+)?)$")
COLUMNS_NOTE = """Columns: *separation*: the median over the adapted modules of the separation ratio of the
prompt's tokens (between-task spread of the task means of a module's standardized inputs / within-task spread;
`mllm-cl report RUN --routing`, docs/methods/routing.md); *own top-1*: the share of image / instruction / answer
tokens whose top-1 expert is their task's own (mean over tasks and modules); *MFN*: routing-based CL; *oracle MFN*:
the same run evaluated again with every sample routed to its own task's expert; *gap*: MFN − oracle MFN; *answer
acc.*: answer-token accuracy (%, teacher-forced) under the gates / with every token sent to its own expert. All at
the last stage."""


def setting_name(instruction_first: bool, tint: float) -> str:
    return f"{'instruction' if instruction_first else 'image'}_first-tint{tint:g}"


def parse_setting(name: str) -> tuple[bool, float] | None:
    match = SETTING.match(name)
    return None if match is None else (match.group(1) == "instruction", float(match.group(2)))


def grid(args: argparse.Namespace) -> list[tuple[bool, float]]:
    if args.quick:
        return list(QUICK)
    return [(first, tint) for first in args.instruction_first for tint in args.tints]


def synthesize(experiment: Path, instruction_first: bool, tint: float, train_size: int | None,
               test_size: int | None) -> dict:
    """The experiment's ``data.synthesize`` with the setting's knobs (and the sizes, where given)."""
    config = yaml.safe_load(Path(experiment).read_text()) or {}
    synth = dict((config.get("data") or {}).get("synthesize") or {})
    if not synth:
        raise SystemExit(f"routing_separability: {experiment} has no data.synthesize (the synthetic benchmark's "
                         f"options); the sweep regenerates that benchmark per setting")
    for key, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None:
            synth[key] = value
    return {**synth, "instruction_first": instruction_first, "tint": tint}


def check_sweep(runs: Path, options: dict) -> None:
    """Record the sweep's options in RUNS/sweep.json, or refuse other ones than those recorded."""
    path = runs / "sweep.json"
    if path.is_file():
        have = json.loads(path.read_text())
        if have != options:
            differ = ", ".join(sorted(k for k in {**have, **options} if have.get(k) != options.get(k)))
            raise SystemExit(f"routing_separability: {runs} holds a sweep run with other options ({differ}; see "
                             f"{path}); choose another --runs, or the same options")
        return
    runs.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(options, indent=1) + "\n")


def _cli(args: list[str], what: str) -> None:
    """One `mllm-cl` command in its own process, its output on the console's stderr only."""
    cmd = [sys.executable, "-m", "mllm_cl.cli", *args]
    t0 = time.time()
    print(f"routing_separability: {what} ...", flush=True)
    done = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise SystemExit(f"routing_separability: {what} failed (status {done.returncode}); rerun: {' '.join(cmd)}")
    print(f"routing_separability: {what} done in {time.time() - t0:.0f} s", flush=True)


def _stage_json(run_dir: Path) -> Path | None:
    results = run_dir / "results.json"
    if not results.is_file():
        return None
    stage = json.loads(results.read_text())["completed_tasks"]
    return run_dir / "routing" / f"stage_{stage:02d}.json"


def run_setting(runs: Path, instruction_first: bool, tint: float, options: dict) -> None:
    """Data, routing run, oracle evaluation and routing diagnosis of one setting (each kept when done)."""
    from mllm_cl.data.synth import ensure  # numpy and PIL only; --help and --compare-only stay light

    name = setting_name(instruction_first, tint)
    folder = (runs / name).resolve()
    synth = synthesize(Path(options["experiment"]), instruction_first, tint, options["train_size"],
                       options["test_size"])
    if ensure(folder / "data", **synth, progress=False):
        print(f"routing_separability: generated {folder / 'data'}", flush=True)
    setting = folder / "setting.yaml"  # layered last: this setting's benchmark, regenerated from it when missing
    setting.write_text(yaml.safe_dump({"data": {"benchmark": str(folder / "data"), "synthesize": synth}},
                                      sort_keys=False))
    run = folder / "routing"
    cmd = ["fit", "--config", options["experiment"], "--config", str(METHOD), "--config", str(setting),
           "--trainer.default_root_dir", str(run), "--seed_everything", str(options["seed"]),
           "--trainer.enable_progress_bar", "false", *GATE_BUDGETS[options["gate_budget"]]]
    if options["steps"] is not None:
        cmd += ["--model.steps_per_task", str(options["steps"])]
    if options["gate_steps"] is not None:
        cmd += [GATE + "gate_steps", str(options["gate_steps"])]
    _cli(cmd + options["fit_args"], f"{name}: routing")
    _cli(["evaluate", str(run), "--out", str(folder / "routing_oracle"), "--", *ORACLE_OPTIONS],
         f"{name}: the oracle evaluation")
    stage = _stage_json(run)
    if stage is None or not stage.is_file() or "separation" not in json.loads(stage.read_text()):
        _cli(["report", str(run), "--routing", "--no-plots", "--limit", str(options["limit"])],
             f"{name}: the routing diagnosis")


# --------------------------------------------------------------------------------------------- the table


def _mfn(results: dict | None) -> float | None:
    return None if results is None else (results.get("metrics") or {}).get("MFN")


def summarize(runs: Path) -> list[dict]:
    """One row per setting folder under ``runs`` with a finished routing run, in grid order."""
    from mllm_cl.report.compare import collect, own_top1

    rows = []
    for folder in sorted(p for p in runs.iterdir() if p.is_dir() and parse_setting(p.name)):
        found = collect([folder])
        if "routing" not in found:
            continue
        results = found["routing"][0]
        oracle = found.get("routing_oracle", [None])[0]
        stage = _stage_json(Path(results["run_dir"]))
        diag = json.loads(stage.read_text()) if stage is not None and stage.is_file() else {}
        ratios = [v["prompt"] for v in (diag.get("separation") or {}).values() if v.get("prompt") is not None]
        accuracy = diag.get("answer_accuracy") or {}
        mfn, oracle_mfn = _mfn(results), _mfn(oracle)
        first, tint = parse_setting(folder.name)
        rows.append({"setting": folder.name, "instruction_first": first, "tint": tint,
                     "separation": statistics.median(ratios) if ratios else None,
                     "own_top1": own_top1(results), "MFN": mfn, "oracle_MFN": oracle_mfn,
                     "gap": None if mfn is None or oracle_mfn is None else mfn - oracle_mfn,
                     "answer_gates": (accuracy.get("gates") or {}).get("mean"),
                     "answer_own": (accuracy.get("own") or {}).get("mean")})
    rows.sort(key=lambda r: (r["instruction_first"], r["tint"]))
    return rows


def _fmt(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value).replace("-", "−")


def table(rows: list[dict]) -> str:
    head = ("| setting | instruction first | tint | separation (median, prompt tokens) | own top-1 image / instruction "
            "/ answer | MFN | oracle MFN | gap | answer acc. gates / own |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        own = "–" if not r["own_top1"] else " / ".join(f"{v:.0f}" for v in r["own_top1"]) + "%"
        answer = " / ".join(_fmt(None if v is None else 100 * v) for v in (r["answer_gates"], r["answer_own"]))
        lines.append(f"| {r['setting']} | {'yes' if r['instruction_first'] else 'no'} | {r['tint']:g} | "
                     f"{_fmt(r['separation'], '{:.3f}')} | {own} | {_fmt(r['MFN'])} | {_fmt(r['oracle_MFN'])} | "
                     f"{_fmt(r['gap'])} | {answer} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path | None:
    """The gap to the oracle against the separation ratio, one point per setting (circles: the image first;
    squares: the instruction first); None when no setting has both."""
    points = [r for r in rows if r["separation"] is not None and r["gap"] is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for first, marker, label in ((False, "o", "image first"), (True, "s", "instruction first")):
        mine = [r for r in points if r["instruction_first"] == first]
        if mine:
            ax.scatter([r["separation"] for r in mine], [r["gap"] for r in mine], marker=marker, label=label,
                       c=[r["tint"] for r in mine], cmap="viridis", vmin=0, vmax=1, edgecolors="black")
    for r in points:
        ax.annotate(f"tint {r['tint']:g}", (r["separation"], r["gap"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("separation ratio (median over modules, prompt tokens)")
    ax.set_ylabel("MFN − oracle MFN")
    ax.set_title("routing-based CL: gap to the oracle against separation (colour: tint)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(runs: Path) -> str:
    """RUNS/separability.md and RUNS/separability.png from the runs already there; returns the table."""
    if not runs.is_dir():
        raise SystemExit(f"routing_separability: no folder {runs}")
    rows = summarize(runs)
    if not rows:
        raise SystemExit(f"routing_separability: no finished routing run under {runs}/SETTING/routing")
    sweep = runs / "sweep.json"
    options = json.loads(sweep.read_text()) if sweep.is_file() else {}
    header = "# Routing-based CL against separability\n\n"
    if options:
        header += "Sweep options (RUNS/sweep.json): " + ", ".join(f"{k} {v}" for k, v in options.items()) + ".\n\n"
    text = table(rows)
    page = runs / f"{OUTPUT}.md"
    page.write_text(header + COLUMNS_NOTE + "\n\n" + text + "\n")
    plot = figure(rows, runs / f"{OUTPUT}.png")
    print(text)
    print(f"routing_separability: wrote {page}" + (f" and {plot}" if plot else ""))
    return text


def _first(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"give true or false, not {text!r}")
    return value == "true"


def _tint(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a tint is in [0, 1], not {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs/separability"),
                   help="folder for the settings' data, runs and the table (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="three settings instead of the grid: the image first without tint, the instruction first "
                        "without tint, the instruction first with tint 0.5 (about 20 minutes on 2 cores with the "
                        "fast gate budget)")
    p.add_argument("--instruction-first", nargs="+", type=_first, default=list(FIRSTS), metavar="{true,false}",
                   help="the grid's instruction_first values: false, the image first as shipped; true, the "
                        "instruction before the image (default: false true)")
    p.add_argument("--tints", nargs="+", type=_tint, default=list(TINTS), metavar="S",
                   help="the grid's tint strengths, each in [0, 1]: each task's images blended with its own colour "
                        "with this weight; 1 leaves a plain colour, no picture to answer from (default: "
                        f"{' '.join(f'{t:g}' for t in TINTS)})")
    p.add_argument("--gate-budget", choices=sorted(GATE_BUDGETS), default="fast",
                   help="fast: the gates trained at the sequence's own samples per step, learning rate and schedule "
                        "(gate_batch, gate_lr, gate_warmup null; about 4-5 minutes a run on 2 cores); phatgoose: "
                        "the config's PHATGOOSE budget, 1024 samples a step at 5e-3 (about 30 minutes a run) "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="expert training steps per task (default: the experiment's steps_per_task, 300 in synth.yaml); "
                        "the gate phase keeps its own gate_steps (see --gate-steps)")
    p.add_argument("--gate-steps", type=int, default=None, metavar="N",
                   help="gate training steps per task (default: the method config's gate_steps, 100)")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed (default: %(default)s)")
    p.add_argument("--experiment", type=Path, default=EXPERIMENT,
                   help="experiment config whose data.synthesize, order and model the settings share (default: "
                        "configs/experiments/synth.yaml, the shapes sequence)")
    p.add_argument("--train-size", type=int, default=None, metavar="N",
                   help="training samples per task (default: the experiment's data.synthesize.train_size)")
    p.add_argument("--test-size", type=int, default=None, metavar="N",
                   help="test samples per task (default: the experiment's data.synthesize.test_size)")
    p.add_argument("--limit", type=int, default=50, metavar="N",
                   help="test prompts per task for the routing diagnosis (`mllm-cl report --routing --limit`; "
                        "default: %(default)s)")
    p.add_argument("--compare-only", action="store_true",
                   help="run nothing: only write the table and figure of the settings already under --runs")
    p.add_argument("fit_args", nargs=argparse.REMAINDER,
                   help="after --: more `mllm-cl fit` options for every routing run (e.g. -- --data.general [])")
    args = p.parse_args(argv)
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    for name in ("steps", "gate_steps", "train_size", "test_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.experiment.is_file():
        p.error(f"--experiment {args.experiment}: no such file")
    t0 = time.time()
    if not args.compare_only:
        options = {"experiment": str(args.experiment.resolve()), "gate_budget": args.gate_budget,
                   "steps": args.steps, "gate_steps": args.gate_steps, "seed": args.seed,
                   "train_size": args.train_size, "test_size": args.test_size, "limit": args.limit,
                   "fit_args": fit_args}
        check_sweep(args.runs, options)
        for first, tint in dict.fromkeys(grid(args)):  # each setting once, in order
            run_setting(args.runs, first, tint, options)
    compare(args.runs)
    print(f"routing_separability: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
