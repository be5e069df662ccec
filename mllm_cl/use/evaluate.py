"""Evaluate a finished run again, every stage, under other evaluation-time options: no training.

    mllm-cl evaluate RUN --out OUT -- --model.method.init_args.route_by task_id
    mllm-cl evaluate RUN --out OUT -- --score_mode official

Each stage's model (the base, then the model after each task) is rebuilt from RUN alone
(``mllm_cl.system.restore``) with the ``mllm-cl fit`` options given after ``--``, and evaluated
as ``mllm-cl fit`` evaluates it (``ContinualLoop.evaluate_zero_shot`` / ``evaluate_stage``: the
matrix row, the general tasks, the method's own numbers, predictions). OUT becomes a run
directory like a fit's: ``config.yaml`` is the config a fit of RUN's config with those options
into OUT would write, ``results.json`` holds the new matrix, metrics, general scores and
predictions, and RUN's parameter counts and training times (the weights are RUN's). Its
``reevaluated`` block names RUN, the options and every config key they changed. OUT holds no
checkpoints: ``mllm-cl predict``/``export`` work on RUN (with the same options, they are what
OUT measured).

Its use: the oracle row of a routed method (``route_by: task_id``: the same trained experts,
each sample sent to its own task's) costs an evaluation instead of a second training run; a
fit with the option stores bit-identical weights (tests/system/test_oracle_fit.py) and gives
the same results (tests/use/test_evaluate.py). Options that change training (``model.lr``,
``data.order``) would describe weights RUN never trained: they are refused.

OUT already holding a finished evaluation of this config is kept (nothing is run); OUT
holding another config is refused, as ``mllm-cl fit`` refuses it.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import yaml

from mllm_cl.errors import UserError
from mllm_cl.use.quiet import restore_quietly

HELP = "evaluate a finished run again under other evaluation-time options (e.g. the oracle routing), no training"

#: Config keys an evaluation may change: what only evaluation reads. Anything else changes what was trained.
EVAL_ONLY = ("model.method.init_args.route_by", "model.method.init_args.eval_routing", "score_mode",
             "eval_future_tasks", "data.eval_batch_size", "data.general", "data.general_scorers",
             "trainer.default_root_dir", "trainer.accelerator", "trainer.devices", "trainer.precision")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN",
                   help="a finished run directory (holds config.yaml, results.json, checkpoints/)")
    p.add_argument("--out", required=True, help="the new run directory for the evaluation (created)")
    p.add_argument("--device", default=None, help="evaluate on this device (cpu, cuda, ...; default: the CPU)")
    p.add_argument("--verbose", action="store_true",
                   help="also print what rebuilding each stage prints (the seed, the check of the task files)")
    p.usage = "mllm-cl evaluate RUN --out OUT [--device DEVICE] [--verbose] [-- FIT_OPTION ...]"
    p.epilog = ("FIT_OPTION (after --): `mllm-cl fit` options that change evaluation only: " + ", ".join(EVAL_ONLY)
                + "; e.g. -- --model.method.init_args.route_by task_id")


def run(args: argparse.Namespace, options: list[str]) -> int:
    """``options``: what followed ``--`` on the command line (the dispatcher splits it off)."""
    reevaluate(args.run, args.out, options, device=args.device, verbose=args.verbose)
    return 0


def reevaluate(source: str | Path, out: str | Path, options: list[str], *, device: str | None = None,
               print_fn=print, verbose: bool = False) -> dict[str, Any]:
    """Every stage of the finished run ``source`` evaluated again with ``options`` into ``out``; its results.
    ``verbose``: also what rebuilding each stage prints (``mllm_cl.use.quiet``)."""
    # heavy: torch and lightning; the command loads without it
    from mllm_cl.system.environment import record_environment
    from mllm_cl.system.loop import ContinualLoop
    from mllm_cl.system.run_dir import RunDir, config_differences

    src, dst = RunDir(source), RunDir(out)
    first = src.finished()
    if first is None:
        raise UserError(f"{src.results_path}: not a finished run (mllm-cl evaluate reads every stage of one; "
                        f"finish it first: rerun its mllm-cl fit)")
    if Path(out).resolve() == src.path.resolve():
        raise UserError(f"mllm-cl evaluate: --out {out} is the run itself; give a new folder")
    options = [*options, "--trainer.default_root_dir", str(out)]
    T = len(first["order"])
    t_start = time.time()
    results, loop = None, None
    for stage in range(T + 1):
        restored = restore_quietly(src.path, stage, device=device, overrides=options, verbose=verbose)
        if stage == 0:
            changed = config_differences((src.path / "config.yaml").read_text(), restored.config_text)
            bad = [c for c in changed if c.split(":", 1)[0] not in EVAL_ONLY]
            if bad:
                raise UserError("mllm-cl evaluate: these options change what was trained, not how it is evaluated "
                                f"(the weights of {src.path} were trained without them):\n  " + "\n  ".join(bad)
                                + f"\nOptions it takes: {', '.join(EVAL_ONLY)}")
            dst.path.mkdir(parents=True, exist_ok=True)
            if dst.check_config(restored.config_text) and (done := dst.finished()) is not None:
                print_fn(f"mllm-cl evaluate: {dst.path} holds this evaluation already; kept")
                return done
            config = yaml.safe_load(restored.config_text)
            score_mode, future = config.get("score_mode", "official"), bool(config.get("eval_future_tasks"))
            results = _fresh(first, source=src.path, options=options[:-2], changed=changed, score_mode=score_mode)
            print_fn(f"mllm-cl evaluate: {src.path} -> {dst.path}; changed: {', '.join(changed) or 'nothing'}")
            print_fn(f"mllm-cl: {record_environment(results, device)}")
        loop = ContinualLoop(restored.module, restored.datamodule, None, dst.path, config_text=restored.config_text,
                             experiment=results["experiment"], seed=results["seed"], eval_future_tasks=future,
                             score_mode=score_mode, print_fn=print_fn)
        loop.bad_samples = results["bad_samples"]
        t0 = time.time()
        if stage == 0:
            loop.evaluate_zero_shot(results)
        else:
            loop.evaluate_stage(results, stage - 1)
            results["timings"]["tasks"][stage - 1]["eval_s"] = round(time.time() - t0, 3)
    loop.finish(results)
    results["reevaluated"]["eval_s"] = round(time.time() - t_start, 3)
    dst.claim(restored.config_text)
    dst.save_results(results)
    print_fn(f"mllm-cl evaluate: {src.path} evaluated again in {time.time() - t_start:.0f} s; results in "
             f"{dst.results_path}")
    return results


def _fresh(first: dict[str, Any], *, source: Path, options: list[str], changed: list[str],
           score_mode: str) -> dict[str, Any]:
    """The source run's results with what evaluation writes cleared; its parameter counts, training
    times and training skips stay (the weights are its)."""
    results = copy.deepcopy(first)
    T = len(results["order"])
    results.update(zero_shot=None, matrix=[[None] * T for _ in range(T)], metrics=None)
    for key in ("method_metrics", "general"):  # the loop writes them again, stage by stage
        results.pop(key, None)
    for task in results["tasks"]:
        task["mode"] = score_mode
    results["bad_samples"] = {"train": (first.get("bad_samples") or {}).get("train", {}), "eval": {}}
    results["reevaluated"] = {"from": str(source), "options": options, "changed": changed}
    return results
