"""Ctrl-C during a real micro run (SIGINT to the `mllm-cl fit` subprocess): the message, status 130,
and a resume from the last checkpoint within the task that gives the matrix of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mllm_cl.fit import main as fit_main
from mllm_cl.system.interrupt import interrupted_message
from mllm_cl.system.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
# 400 steps per task: a task trains for several seconds on an idle machine (50 finished before the signal
# arrived there), long enough to be interrupted in.
ARGS = ["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml"),
        "--model.steps_per_task", "400"]


def test_ctrl_c_names_task_and_phase_exits_130_and_the_rerun_resumes_to_the_same_matrix(bench, tmp_path):
    whole = tmp_path / "whole"
    fit_main([*ARGS, "--data.benchmark", str(bench), "--trainer.default_root_dir", str(whole)])
    expected = json.loads((whole / "results.json").read_text())

    run = tmp_path / "cut"
    cmd = [sys.executable, "-m", "mllm_cl.cli", "fit", *ARGS, "--data.benchmark", str(bench),
           "--trainer.default_root_dir", str(run), "--checkpoint_every_n_steps", "10"]
    # A job started in the background by a non-interactive shell inherits SIGINT ignored (and Python then keeps
    # it ignored): give the child the default disposition, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "task 2/2 mood: phase train" in line:
            # into task 2's fit, once its first in-task checkpoint is written (400 steps take seconds; on a
            # loaded machine a fixed wait can end before step 10)
            deadline = time.time() + 120
            while RunDir(run).in_task() is None and time.time() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + out + err[-3000:]
    assert "Traceback" not in err
    partial = json.loads((run / "results.json").read_text())
    assert partial["completed_tasks"] == 1 and partial["matrix"][1] == [None, None]
    saved = json.loads((RunDir(run).in_task() / "structure.json").read_text())["in_task"]  # within task 2
    assert saved["task"] == 1 and saved["step"] % 10 == 0 and 0 < saved["step"] < 400
    assert (f"mllm-cl: interrupted during task 2 (phase train); rerun the same command to resume in task 2 "
            f"(phase train) after step {saved['step']}") in err

    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resuming after task 1)" in again.stdout and "task 1/2" not in again.stdout
    assert f"resuming task 2 (train) after step {saved['step']} of 400" in again.stdout
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["zero_shot"] == expected["zero_shot"] and resumed["matrix"] == expected["matrix"]
    assert resumed["metrics"] == expected["metrics"]


def test_the_message_says_how_far_the_run_got():
    assert interrupted_message(2, "phase gate", 1, ("gate", 40)) == \
        "interrupted during task 2 (phase gate); rerun the same command to resume in task 2 (phase gate) after step 40"
    assert interrupted_message(2, "phase expert", 1) == \
        "interrupted during task 2 (phase expert); rerun the same command to resume after task 1"
    assert interrupted_message(None, "the zero-shot evaluation", 0) == ("interrupted during the zero-shot evaluation; "
                                                                        "rerun the same command to resume (no task was "
                                                                        "finished: it starts with task 1)")
