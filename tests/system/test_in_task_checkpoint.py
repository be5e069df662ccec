"""Checkpoints within a task: a run stopped right after one resumes there and ends as an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_cl.fit import main as fit_main
from mllm_cl.system.in_task import FAULT_STEP_ENV, InjectedStepFault

ROOT = Path(__file__).resolve().parents[2]
# Two phases each for routing (expert, gate), cmoe (probe, train; from task 2) and cram (warmup, stable).
EXTRA = {"routing": ["--model.method.init_args.gate_steps", "4", "--model.method.init_args.gate_batch", "8"],
         "cmoe": ["--model.method.init_args.probe_steps", "4", "--model.method.init_args.vae_steps", "20"],
         "cram": ["--model.method.init_args.warmup_share", "0.5"]}


def _fit(bench, run, method, *extra):
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), "--model.steps_per_task", "6",
              "--checkpoint_every_n_steps", "2", *EXTRA.get(method, []), *extra])
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("method, stop", [("lora_ft", "2/train/4"), ("routing", "2/gate/2"), ("routing", "2/expert/4"),
                                          ("cmoe", "2/probe/2"), ("cmoe", "2/train/4"), ("cram", "2/warmup/2"),
                                          ("cram", "2/stable/2")])
def test_a_run_stopped_within_a_task_resumes_there_to_the_same_result(bench, tmp_path, monkeypatch, capsys, method,
                                                                       stop):
    whole = _fit(bench, tmp_path / "whole", method)
    assert not (tmp_path / "whole/checkpoints/in_task").exists()  # dropped once each task is finished

    cut = tmp_path / "cut"
    monkeypatch.setenv(FAULT_STEP_ENV, stop)
    with pytest.raises(InjectedStepFault):
        _fit(bench, cut, method)
    saved = json.loads((cut / "checkpoints/in_task/structure.json").read_text())["in_task"]
    assert f"{saved['task'] + 1}/{saved['phase_name']}/{saved['step']}" == stop
    monkeypatch.delenv(FAULT_STEP_ENV)
    capsys.readouterr()
    resumed = _fit(bench, cut, method)
    task, phase, step = stop.split("/")
    assert f"resuming task {task} ({phase}) after step {step} of" in capsys.readouterr().out

    assert resumed["matrix"] == whole["matrix"] and resumed["metrics"] == whole["metrics"]
    assert resumed["params"] == whole["params"] and resumed["bad_samples"] == whole["bad_samples"]
    assert resumed.get("method_metrics") == whole.get("method_metrics")
    assert resumed["timings"]["tasks"][1]["phases"].keys() == whole["timings"]["tasks"][1]["phases"].keys()
    for n in (1, 2):
        a, b = (load_file(tmp_path / r / f"checkpoints/task_{n:02d}/adapters.safetensors") for r in ("whole", "cut"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert not (cut / "checkpoints/in_task").exists()


def test_checkpoints_within_a_task_do_not_change_the_training(bench, tmp_path):
    with_ = _fit(bench, tmp_path / "with", "lora_ft")
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/lora_ft.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(tmp_path / "without"),
              "--model.steps_per_task", "6"])
    a, b = (load_file(tmp_path / r / "checkpoints/task_02/adapters.safetensors") for r in ("with", "without"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert with_["matrix"] == json.loads((tmp_path / "without/results.json").read_text())["matrix"]


def test_a_method_that_cannot_resume_within_a_task_is_refused_before_training(bench, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every_n_steps: method same cannot resume within a task"):
        _fit(bench, tmp_path / "same", "same")
    assert not (tmp_path / "same/predictions").exists()
