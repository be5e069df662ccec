"""`mllm-cl fit` end to end on the micro config: run directory, baselines, resume, refusal, freezing."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_cl.fit import main as fit_main
from mllm_cl.system.loop import FAULT_ENV, InjectedFault
from mllm_cl.system.run_dir import ConfigMismatch

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["zero_shot", "lora_ft", "moelora", "multitask", "individual", "routing", "cmoe", "same", "cram"]
EXTRA = {"routing": ["--model.method.init_args.gate_steps", "2", "--model.method.init_args.gate_batch", "null"],
         "cmoe": ["--model.method.init_args.probe_steps", "2", "--model.method.init_args.vae_steps", "20"],
         "same": ["--model.method.init_args.warmup_steps", "1", "--model.method.init_args.refresh_every", "2"]}


def _fit(bench, run_dir, method, *extra):
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run_dir), *extra])
    return json.loads((run_dir / "results.json").read_text())


def test_cli_writes_the_run_directory(bench, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "fit", "--config", "configs/micro.yaml",
                          "--config", "configs/methods/lora_ft.yaml", "--data.benchmark", str(bench),
                          "--trainer.default_root_dir", str(run)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"run directory {run}" in out.stdout and "finished; results in" in out.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["schema_version"] == 1 and results["method"] == "lora_ft" and results["seed"] == 0
    assert results["order"] == ["colour", "mood"]
    assert results["tasks"] == [{"name": "colour", "scorer": "exact_match", "mode": "official"},
                                {"name": "mood", "scorer": "exact_match", "mode": "official"}]
    assert len(results["zero_shot"]) == 2 and results["matrix"][0][1] is None
    assert set(results["metrics"]) == {"MFT", "MFN", "MAA", "BWT", "forgetting", "FWT"}
    assert results["completed_tasks"] == 2
    for n in (1, 2):
        assert (run / f"checkpoints/task_{n:02d}/adapters.safetensors").exists()
        structure = json.loads((run / f"checkpoints/task_{n:02d}/structure.json").read_text())
        assert all(layer["experts"] == {"shared": 8} for layer in structure["layers"].values())
    for stage, tasks in ((0, ["colour", "mood"]), (1, ["colour"]), (2, ["colour", "mood"])):
        for t in tasks:
            rows = [json.loads(line)
                    for line in (run / f"predictions/stage_{stage:02d}/{t}.jsonl").read_text().splitlines()]
            assert len(rows) == 3 and set(rows[0]) == {"question_id", "prompt", "text", "answer"}
    assert (run / "config.yaml").exists()
    # Adapters only: kilobytes, not the base model.
    assert (run / "checkpoints/task_01/adapters.safetensors").stat().st_size < 200_000


@pytest.mark.parametrize("method", ["routing", "cmoe"])
def test_the_model_staying_on_its_device_trains_what_lightnings_round_trip_does(bench, tmp_path, method,
                                                                                 monkeypatch):
    import mllm_cl.fit as fit

    moved = []
    cpu = torch.nn.Module.cpu
    monkeypatch.setattr(torch.nn.Module, "cpu", lambda self: moved.append(type(self).__name__) or cpu(self))
    kept = _fit(bench, tmp_path / "kept", method, *EXTRA[method])
    assert moved == []
    monkeypatch.setattr(fit, "phase_strategy", lambda *args, **kwargs: None)  # Lightning's own strategy
    stock = _fit(bench, tmp_path / "stock", method, *EXTRA[method])
    assert "ContinualMLLM" in moved  # its teardown sends the module to the CPU after every phase
    assert kept["matrix"] == stock["matrix"] and kept.get("method_metrics") == stock.get("method_metrics")
    for n in (1, 2):
        a, b = (load_file(tmp_path / r / f"checkpoints/task_{n:02d}/adapters.safetensors") for r in ("kept", "stock"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_every_baseline_runs_end_to_end(bench, tmp_path, method, monkeypatch):
    import recording_callback

    import mllm_cl.methods as methods

    moved = []  # the model stays where it is between phases: nothing is sent to the CPU
    cpu = torch.nn.Module.cpu
    monkeypatch.setattr(torch.nn.Module, "cpu", lambda self: moved.append(type(self).__name__) or cpu(self))
    recording_callback.UNUSED.clear()
    results = _fit(bench, tmp_path / method, method, *EXTRA.get(method, []),
                   "--trainer.callbacks+", "recording_callback.GradientCoverage")
    assert results["completed_tasks"] == 2 and results["method"] == method
    assert moved == []
    # DDP looks for unused parameters only where the method says a step can leave some
    unused = {phase: names for phase, names in recording_callback.UNUSED.items() if names}
    cls = next(c for c in vars(methods).values() if isinstance(c, type) and getattr(c, "name", None) == method)
    if not cls.unused_parameters:
        assert unused == {}, unused
    if method in ("zero_shot", "multitask"):  # one-row methods: MFN only
        assert results["matrix"][0] == [None, None] and None not in results["matrix"][1]
        assert results["metrics"]["MFT"] is None and results["metrics"]["MFN"] is not None
    else:
        assert results["matrix"][0][0] is not None and results["metrics"]["BWT"] is not None
    trainable = [p["total"] for p in results["params"]["trainable_per_task"]]
    if method == "zero_shot":
        assert trainable == [0, 0]
    elif method == "multitask":
        assert trainable[0] == 0 and trainable[1] > 0  # trains once, on the union, at the end
    else:
        assert all(n > 0 for n in trainable)
    if method in ("individual", "routing"):  # one expert (+ gate) per task: storage doubles, each task trains one
        stored = [p["total"] for p in results["params"]["stored_per_task"]]
        assert stored[1] == 2 * stored[0] and trainable[1] == trainable[0]


@pytest.mark.parametrize("method", ["individual", "routing"])
def test_old_experts_stay_bit_identical(bench, tmp_path, method):
    run = tmp_path / method
    results = _fit(bench, run, method, *EXTRA.get(method, []))
    after1 = load_file(run / "checkpoints/task_01/adapters.safetensors")
    after2 = load_file(run / "checkpoints/task_02/adapters.safetensors")
    task0 = [k for k in after1 if ".experts.task0." in k or ".gates.task0" in k]
    assert task0 and all(torch.equal(after1[k], after2[k]) for k in task0)
    assert any(".experts.task1." in k for k in after2)
    if method == "routing":  # the gate trained in its own phase: no longer zero
        assert any(".gates.task0" in k for k in task0) and all(after1[k].abs().sum() > 0 for k in task0)
        assert all(set(t["phases"]) == {"expert", "gate"} for t in results["timings"]["tasks"])


@pytest.mark.parametrize("method", ["lora_ft", "cmoe", "cram", "same"])  # cmoe, cram, same: data-dependent state
def test_interrupted_run_resumes_to_the_same_result(bench, tmp_path, monkeypatch, method):
    args = [method, "--model.steps_per_task", "4", *EXTRA.get(method, [])]
    whole = _fit(bench, tmp_path / "whole", *args)
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(InjectedFault):
        _fit(bench, tmp_path / "cut", *args)
    partial = json.loads((tmp_path / "cut/results.json").read_text())
    assert partial["completed_tasks"] == 1 and partial["matrix"][1] == [None, None]
    monkeypatch.delenv(FAULT_ENV)
    first_log = (tmp_path / "cut/logs/metrics.csv").read_text()
    resumed = _fit(bench, tmp_path / "cut", *args)
    # The first attempt's log is kept; the resumed one logs beside it.
    assert (tmp_path / "cut/logs/metrics.csv").read_text() == first_log
    assert "task2_mood" in (tmp_path / "cut/logs/resume-1/metrics.csv").read_text()
    assert resumed["matrix"] == whole["matrix"] and resumed["zero_shot"] == whole["zero_shot"]
    assert resumed.get("method_metrics") == whole.get("method_metrics")
    a = load_file(tmp_path / "whole/checkpoints/task_02/adapters.safetensors")
    b = load_file(tmp_path / "cut/checkpoints/task_02/adapters.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith(".B"))  # training moved the adapters


def test_a_different_config_on_an_existing_run_is_refused(bench, tmp_path):
    _fit(bench, tmp_path / "run", "lora_ft")
    with pytest.raises(ConfigMismatch) as err:
        _fit(bench, tmp_path / "run", "lora_ft", "--model.lr", "0.01")
    assert "refusing to resume" in str(err.value) and "\n  model.lr: 0.003 -> 0.01" in str(err.value)


def test_eval_future_tasks_fills_the_entry_above_the_diagonal(bench, tmp_path):
    results = _fit(bench, tmp_path / "fwt", "lora_ft", "--eval_future_tasks", "true")
    assert results["matrix"][0][1] is not None and results["metrics"]["FWT"] is not None


def test_continual_callbacks_live_across_tasks_without_duplicates(bench, tmp_path):
    import recording_callback

    recording_callback.CALLS.clear()
    _fit(bench, tmp_path / "cb", "lora_ft", "--trainer.callbacks+", "recording_callback.Recorder")
    calls = recording_callback.CALLS
    assert len({c[1] for c in calls}) == 1  # one instance for the whole sequence
    order = [c[0] for c in calls]
    assert order == ["task_start", "phase_start", "fit_start", "phase_end", "task_end"] * 2
    fits = [c for c in calls if c[0] == "fit_start"]
    assert all(c[3] == 1 for c in fits) and fits[0][2] != fits[1][2]  # a fresh Trainer per phase, one copy each


@pytest.mark.parametrize("precision, adapter_dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_precision_plugins_train_the_expert_layers(bench, tmp_path, precision, adapter_dtype):
    """Mixed precision keeps fp32 adapters (autocast computes in bf16); '-true' converts them too.
    (16-mixed is GPU only: Lightning turns it into bf16-mixed on the CPU.)"""
    run = tmp_path / precision
    results = _fit(bench, run, "moelora", "--trainer.precision", precision)
    assert results["completed_tasks"] == 2
    adapters = load_file(run / "checkpoints/task_02/adapters.safetensors")
    assert {v.dtype for k, v in adapters.items() if ".experts." in k} == {adapter_dtype}
    with open(run / "logs/metrics.csv") as f:
        losses = [float(v) for row in csv.DictReader(f) for k, v in row.items() if k.endswith("/loss") and v]
    assert len(losses) == 6 and all(0 < loss < 20 for loss in losses)  # 3 steps per task, finite


def test_the_gate_phase_trains_with_its_own_lr_warmup_and_accumulation(bench, tmp_path):
    import recording_callback

    recording_callback.OPTIM.clear()
    _fit(bench, tmp_path / "gates", "routing", "--model.method.init_args.gate_steps", "4",
         "--model.method.init_args.gate_lr", "0.05", "--model.method.init_args.gate_warmup", "0.5",
         "--model.method.init_args.gate_batch", "12", "--model.warmup_steps", "0",
         "--trainer.callbacks+", "recording_callback.OptimizerRecorder")
    steps = recording_callback.OPTIM
    expert = [s for s in steps if s["phase"] == "expert"]
    gate = [s for s in steps if s["phase"] == "gate"]
    assert len(expert) == 2 * 3 and len(gate) == 2 * 4  # micro: 3 expert steps, 4 gate steps per task
    assert all(s["lr"] == 0.003 and s["batches"] == 1 and s["accumulate"] == 1 for s in expert)
    assert all(s["batches"] == 3 and s["accumulate"] == 3 for s in gate)
    # warm-up over half of the 4 steps (2), linear: 0.025, 0.05, then constant 0.05
    assert [round(s["lr"], 6) for s in gate[:4]] == [0.025, 0.05, 0.05, 0.05]
