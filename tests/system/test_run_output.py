"""What `mllm-cl fit` prints when its output goes to a file (no terminal), and what it records."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def piped_run(bench, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "fit", "--config", "configs/micro.yaml",
                          "--config", "configs/methods/lora_ft.yaml", "--data.benchmark", str(bench),
                          "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "true"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "MLLM_CL_PROGRESS_SECONDS": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out.stdout + out.stderr


def test_progress_in_optimizer_steps_and_no_third_party_lines(piped_run):
    _, text = piped_run
    lines = text.splitlines()
    for task, name in ((1, "colour"), (2, "mood")):  # every step printed (interval 0), the phase's last one too
        steps = [line for line in lines if line.startswith(f"task {task}/2 {name} · train · ")]
        assert [re.match(r".* · (\d+)/3 · loss \d+\.\d\d · \d+s$", line).group(1) for line in steps] == ["1", "2", "3"]
    for noise in ("Epoch", "GPU available", "TPU available", "litlogger", "LeafSpec", "Loading weights",
                  "FutureWarning", "past_key_values", "Warning"):
        assert noise not in text, (noise, text)
    assert re.search(r"^mllm-cl: cpu \(.+, \d+ threads?\) · torch ", text, re.M)


def test_results_record_the_environment(piped_run):
    run, _ = piped_run
    env = json.loads((run / "results.json").read_text())["environment"]
    assert set(env) >= {"python", "packages", "cpu", "cpu_capability", "threads", "device", "code"}
    assert set(env["packages"]) >= {"torch", "transformers", "lightning", "peft"}
    assert env["device"] == "cpu" and env["threads"] >= 1
    assert env["code"].get("commit") or "not a git checkout" in env["code"]["note"]
