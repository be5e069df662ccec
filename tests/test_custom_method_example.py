"""examples/custom_method: a Method subclass outside the package, run by `mllm-cl fit` as its README says."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_method"


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "mllm_cl.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_custom_method_example_fits_a_two_task_sequence(tmp_path):
    path = os.pathsep.join([str(EXAMPLE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    bench, run = tmp_path / "synth", tmp_path / "run"
    out = _cli("data", "synth", "--out", str(bench), "--tasks", "color", "count", "--train-size", "16",
               "--test-size", "4", "--quiet", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    out = _cli("fit", "--config", "configs/micro.yaml", "--config", str(EXAMPLE / "config.yaml"),
               "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finished; results in" in out.stdout

    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "warm_start" and results["completed_tasks"] == 2
    assert results["order"] == ["color", "count"]
    assert len(results["matrix"][0]) == 2 and results["matrix"][0][0] is not None
    assert all(v is not None for v in results["matrix"][1])
    assert set(results["metrics"]) == {"MFT", "MFN", "MAA", "BWT", "forgetting", "FWT"}

    structure = json.loads((run / "checkpoints/task_02/structure.json").read_text())["layers"]
    assert len(structure) == 8  # q, v, up and down projections of both decoder layers
    for layer in structure.values():
        assert layer["experts"] == {"task0": 8, "task1": 8}
        assert layer["routers"] == {"default": {"class": "TaskRouter", "experts": ["task0", "task1"]}}

    first, second = (load_file(run / f"checkpoints/task_0{n}/adapters.safetensors") for n in (1, 2))
    for key in (k for k in second if ".experts.task0." in k):
        assert torch.equal(first[key], second[key]), f"{key}: task 0's expert moved while task 1 trained"
    for name in structure:
        a0, a1 = second[f"{name}.experts.task0.A"], second[f"{name}.experts.task1.A"]
        # warm-started: task 1's expert began as task 0's and moved a few small steps from it (a fresh
        # random A would lie about sqrt(2) x |A0| away)
        assert (a1 - a0).norm() < 0.5 * a0.norm(), name
        assert second[f"{name}.experts.task1.B"].abs().sum() > 0
