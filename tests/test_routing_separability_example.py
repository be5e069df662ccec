"""examples/routing_separability: the table and figure from run directories, the sweep's bookkeeping, and a run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "routing_separability" / "run.py"
TASKS = ["color", "count"]
PAGE = "separability"  # RUNS/separability.md, a file the example writes


def _example():
    spec = importlib.util.spec_from_file_location("routing_separability_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def _run(folder: Path, mfn: float, *, own=None, separation=None, accuracy=None, finished=True) -> None:
    """A minimal run directory: results.json and, with ``own``, the routing diagnosis of its last stage."""
    folder.mkdir(parents=True)
    results = {"schema_version": 1, "method": "routing", "order": TASKS, "seed": 0, "tasks": TASKS,
               "completed_tasks": 2 if finished else 1, "metrics": {"MFN": mfn}}
    (folder / "results.json").write_text(json.dumps(results))
    if own is not None:
        (folder / "routing").mkdir()
        diag = {"summary": {t: {k: {"own_top1": own, "own_weight": own} for k in ("image", "instruction", "answer")}
                            for t in TASKS},
                "separation": separation, "answer_accuracy": accuracy}
        (folder / "routing" / "stage_02.json").write_text(json.dumps(diag))


def _modules(*ratios):
    return {f"layers.{i}.q_proj": {"prompt": r, "answer": 0.5, "all": 0.4} for i, r in enumerate(ratios)}


def test_compare_only_writes_the_table_and_figure_of_the_runs_there(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "image_first-tint0" / "routing", 10.0, own=0.3, separation=_modules(0.1, 0.07, 0.13),
         accuracy={"gates": {"mean": 0.632}, "own": {"mean": 0.901}})
    _run(runs / "image_first-tint0" / "routing_oracle", 60.0)
    _run(runs / "instruction_first-tint0.5" / "routing", 55.0, own=0.98, separation=_modules(1.0, None, 0.8, 1.2))
    _run(runs / "instruction_first-tint0.5" / "routing_oracle", 58.5)
    _run(runs / "instruction_first-tint0" / "routing", 20.0, own=0.5, separation=None)  # no oracle, no ratios
    _run(runs / "image_first-tint0.25" / "routing", 5.0, finished=False)  # half-run: no row
    (runs / "data").mkdir()  # not a setting

    out = _script("--runs", str(runs), "--compare-only")
    assert out.returncode == 0, out.stderr[-3000:]
    text = (runs / f"{PAGE}.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "setting" not in line]
    assert rows == [
        "| image_first-tint0 | no | 0 | 0.100 | 30 / 30 / 30% | 10.0 | 60.0 | −50.0 | 63.2 / 90.1 |",
        "| instruction_first-tint0 | yes | 0 | – | 50 / 50 / 50% | 20.0 | – | – | – / – |",
        "| instruction_first-tint0.5 | yes | 0.5 | 1.000 | 98 / 98 / 98% | 55.0 | 58.5 | −3.5 | – / – |",
    ]
    assert (runs / f"{PAGE}.png").stat().st_size > 0
    assert f"{PAGE}.md" in out.stdout


def test_compare_only_without_finished_runs_says_so(tmp_path):
    (tmp_path / "image_first-tint0").mkdir()
    out = _script("--runs", str(tmp_path), "--compare-only")
    assert out.returncode != 0 and "no finished routing run" in out.stderr


def test_settings_grid_and_sweep_bookkeeping(tmp_path):
    ex = _example()
    for first, tint in ((False, 0.0), (True, 0.25), (True, 1.0)):
        assert ex.parse_setting(ex.setting_name(first, tint)) == (first, tint)
    assert ex.setting_name(True, 0.5) == "instruction_first-tint0.5" and ex.parse_setting("data") is None
    options = {"experiment": "x.yaml", "gate_budget": "fast", "steps": None, "fit_args": []}
    ex.check_sweep(tmp_path, options)
    ex.check_sweep(tmp_path, dict(options))  # the same options: resumed
    with pytest.raises(SystemExit, match="gate_budget"):
        ex.check_sweep(tmp_path, {**options, "gate_budget": "phatgoose"})
    synth = ex.synthesize(ex.EXPERIMENT, True, 0.5, None, 20)
    assert synth["instruction_first"] is True and synth["tint"] == 0.5 and synth["test_size"] == 20
    assert synth["train_size"] == 1000 and synth["tasks"][:4] == ["color", "classify", "count", "ocr"]


def test_help_explains_every_option():
    out = _script("--help")
    assert out.returncode == 0
    for flag in ("--runs", "--quick", "--instruction-first", "--tints", "--gate-budget", "--steps", "--gate-steps",
                 "--seed", "--experiment", "--train-size", "--test-size", "--limit", "--compare-only"):
        assert flag in out.stdout
    assert "phatgoose" in out.stdout and "fast" in out.stdout


def test_one_setting_end_to_end_on_a_micro_sequence(tmp_path):
    """Data, routing, oracle, diagnosis and table for one setting of a two-task micro sequence (about 30 s on
    2 cores); the same RUNS with another gate budget is refused."""
    experiment = tmp_path / "micro.yaml"
    experiment.write_text(json.dumps({
        "experiment": "micro", "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1},
        "model": {"backbone": "tiny-clip-llama", "steps_per_task": 3, "lr": 0.003},
        "data": {"benchmark": "unused", "order": TASKS, "batch_size": 4, "eval_batch_size": 8,
                 "template": "short", "max_length": 96,
                 "synthesize": {"tasks": TASKS, "train_size": 16, "test_size": 4, "image_size": 32, "seed": 0}}}))
    runs = tmp_path / "runs"
    args = ("--runs", str(runs), "--experiment", str(experiment), "--instruction-first", "true", "--tints", "0.5",
            "--gate-steps", "2", "--limit", "4")
    out = _script(*args, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    setting = runs / "instruction_first-tint0.5"
    manifest = json.loads((setting / "data" / "benchmark.json").read_text())
    assert manifest["instruction_first"] is True and manifest["tint"] == 0.5
    diag = json.loads((setting / "routing" / "routing" / "stage_02.json").read_text())
    assert diag["separation"] and diag["answer_accuracy"]
    assert json.loads((setting / "routing_oracle" / "results.json").read_text())["completed_tasks"] == 2
    assert "| instruction_first-tint0.5 | yes | 0.5 |" in (runs / f"{PAGE}.md").read_text()
    out = _script(*args, "--gate-steps", "3")
    assert out.returncode != 0 and "other options (gate_steps" in out.stderr
