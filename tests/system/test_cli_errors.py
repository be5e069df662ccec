"""`mllm-cl fit` as a user meets its errors: real subprocesses, one clean message each, and early.

Each subprocess pays ~5 s of imports; the step budgets are large on purpose where a test
must show that nothing trained (training the first task would take minutes)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ENV.pop("MLLM_CL_DEBUG", None)
COLOURS = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}


def _fit_args(bench, run, *extra):
    return ["fit", "--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml"),
            "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), *extra]


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mllm_cl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


@pytest.fixture
def broken_last_task(tmp_path, make_bench):
    """A two-task benchmark whose last task's training file has a record naming a missing image."""
    (tmp_path / "bench").mkdir()
    bench = make_bench(tmp_path / "bench", COLOURS, train=12, test=3)
    train = json.loads((bench / "mood_train.json").read_text())
    train[5]["image"] = "images/purple.png"
    (bench / "mood_train.json").write_text(json.dumps(train))
    return bench


def test_a_malformed_file_of_the_last_task_stops_the_run_before_any_trainer(broken_last_task, tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    # 20000 steps per task: training task 1 first would take many minutes on any CPU (50 steps take ~2 s).
    out = _cli(*_fit_args(broken_last_task, run, "--model.steps_per_task", "20000"))
    seconds = time.time() - t0
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"mllm-cl: error: {broken_last_task / 'mood_train.json'}, record 5: missing image: " in out.stderr
    assert "purple.png" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 4
    assert "GPU available" not in out.stderr  # Lightning says this whenever a Trainer is built: none was
    assert "stage 00" not in out.stdout and "phase" not in out.stdout and not run.exists()
    assert seconds < 90, f"took {seconds:.0f} s"
    print(f"failed after {seconds:.1f} s (imports and the tiny backbone included)")


def test_debug_brings_the_traceback_back(broken_last_task, tmp_path):
    out = _cli(*_fit_args(broken_last_task, tmp_path / "run"), "--debug")
    assert out.returncode == 2
    assert "Traceback (most recent call last)" in out.stderr and "BadSampleError" in out.stderr
    assert "mood_train.json, record 5: missing image" in out.stderr


def test_refused_resume_names_full_keys_and_a_finished_run_is_left_alone(tmp_path, make_bench):
    (tmp_path / "bench").mkdir()
    bench = make_bench(tmp_path / "bench", COLOURS, train=12, test=3)
    run = tmp_path / "run"
    fit_main(_fit_args(bench, run)[1:])
    results = (run / "results.json").read_bytes()
    files = sorted(p.relative_to(run) for p in run.rglob("*"))

    again = _cli(*_fit_args(bench, run))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"mllm-cl: {run} holds a finished run of this config (2 of 2 tasks); nothing to do" in again.stdout
    assert "resuming" not in again.stdout and "GPU available" not in again.stderr
    assert ((run / "results.json").read_bytes() == results
            and sorted(p.relative_to(run) for p in run.rglob("*")) == files)

    other = _cli(*_fit_args(bench, run, "--model.lr", "0.01", "--data.batch_size", "2"))
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "refusing to resume a run with another config" in other.stderr
    assert "  model.lr: 0.003 -> 0.01\n" in other.stderr and "  data.batch_size: 4 -> 2\n" in other.stderr
