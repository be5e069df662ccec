"""`mllm-cl fit` as met in a first hour: Trainer options checked before the zero-shot evaluation, classes
that cannot be built said in one message, loggers that work without save_dir, and one logged run per fit
on one step axis with the config as its hyperparameters."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from mllm_cl.errors import UserError
from mllm_cl.fit import main as fit_main
from mllm_cl.system.loop import FAULT_ENV, InjectedFault

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("MLLM_CL_DEBUG", None)
ROUTING = ["--model.method.init_args.gate_steps", "2", "--model.method.init_args.gate_batch", "null"]
FINALIZED: list[str] = []


class CountingLogger(CSVLogger):
    """A CSV logger that records each ``finalize``."""

    def finalize(self, status: str) -> None:
        FINALIZED.append(status)
        super().finalize(status)


def _args(bench, run, method="lora_ft", *extra):
    return ["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
            "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), *extra]


def _cli(args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "mllm_cl.cli", "fit", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd, check=False)


def _one_message(out) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 4, out.stderr[-3000:]


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _loss_steps(rows: list[dict]) -> list[tuple[int, str]]:
    return [(int(r["step"]), k) for r in rows for k in r if k.endswith("/loss")]


def _eval_steps(rows: list[dict]) -> dict[int, int]:
    """stage -> the step its scores were logged at."""
    return {int(float(r["eval/stage"])): int(r["step"]) for r in rows if any(k.startswith("eval/") and
                                                                                k != "eval/stage" for k in r)}


@pytest.mark.parametrize("option, value", [("gradient_clip_val", "0.5"), ("gradient_clip_algorithm", "value")])
def test_trainer_gradient_clipping_is_refused_before_the_zero_shot_evaluation(bench, tmp_path, option, value):
    run = tmp_path / "run"
    out = _cli(_args(bench, run, "lora_ft", f"--trainer.{option}", value))
    _one_message(out)
    assert f"mllm-cl: error: trainer.{option} (" in out.stderr and "model.grad_clip" in out.stderr
    assert "stage 00" not in out.stdout and not (run / "predictions/stage_00").exists()


def test_a_clash_with_the_trainers_clipping_is_found_before_any_step():
    from mllm_cl.experts import ExpertSetup
    from mllm_cl.methods import Individual
    from mllm_cl.system.module import ContinualMLLM

    module = ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), grad_clip=1.0)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "accelerator": "cpu"}
    module.check_gradient_clipping(L.Trainer(**quiet))  # the model's clipping alone: fine
    with pytest.raises(UserError, match=r"model.grad_clip \(1.0\)"):
        module.check_gradient_clipping(L.Trainer(gradient_clip_val=0.5, **quiet))
    assert module._trainer is None


HAS_TENSORBOARD = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
BROKEN = [
    pytest.param("lora_ft", ["--trainer.logger", "TensorBoardLogger"],
                 "trainer.logger: lightning.pytorch.loggers.TensorBoardLogger could not be built (ModuleNotFoundError)",
                 marks=pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed"), id="logger-package"),
    pytest.param("lora_ft", ["--trainer.callbacks+", "lightning.pytorch.callbacks.EarlyStopping",
                             "--trainer.callbacks.monitor", "x", "--trainer.callbacks.mode", "sideways"],
                 "trainer.callbacks[0]: lightning.pytorch.callbacks.EarlyStopping could not be built "
                 "(MisconfigurationException): `mode` can be min, max, got sideways", id="callback"),
    pytest.param("cmoe", ["--model.method.init_args.route_by", "nowhere"],
                 "model.method: mllm_cl.methods.LLaVACMoE could not be built (ValueError): cmoe: route_by",
                 id="method"),
]


@pytest.mark.parametrize("method, extra, message", BROKEN)
def test_a_class_that_cannot_be_built_is_one_message(bench, tmp_path, method, extra, message):
    run = tmp_path / "run"
    out = _cli(_args(bench, run, method, *extra))
    _one_message(out)
    assert f"mllm-cl: error: {message}" in out.stderr
    assert not run.exists()


def test_a_logger_without_save_dir_logs_one_run_on_one_step_axis_in_the_run_directory(bench, tmp_path):
    run = tmp_path / "run"
    out = _cli(_args(bench, run, "routing", *ROUTING, "--trainer.logger", "CSVLogger"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.csv")) == [
        Path("run/lightning_logs/version_0/metrics.csv")]  # one logger run, in the run directory
    logs = run / "lightning_logs/version_0"
    rows = _rows(logs / "metrics.csv")
    steps = _loss_steps(rows)
    # expert (3 steps) and gate (2 steps) per task, on one axis; the key keeps task and phase.
    assert steps == [(0, "task1_colour/expert/loss"), (1, "task1_colour/expert/loss"), (2, "task1_colour/expert/loss"),
                     (3, "task1_colour/gate/loss"), (4, "task1_colour/gate/loss"),
                     (5, "task2_mood/expert/loss"), (6, "task2_mood/expert/loss"), (7, "task2_mood/expert/loss"),
                     (8, "task2_mood/gate/loss"), (9, "task2_mood/gate/loss")]
    assert _eval_steps(rows) == {0: 0, 1: 5, 2: 10}  # each stage at the step it ran at
    assert any(k.startswith("final/") and r["step"] == "10" for r in rows for k in r)
    hparams = yaml.safe_load((logs / "hparams.yaml").read_text())
    assert hparams["model"]["lr"] == 0.003 and hparams["trainer"]["logger"]["init_args"]["save_dir"] == str(run)
    assert json.loads((run / "results.json").read_text())["global_step"] == 10


def test_a_resumed_run_goes_on_from_the_run_wide_step(bench, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(InjectedFault):
        fit_main(_args(bench, run))
    first = _rows(run / "logs/metrics.csv")
    assert [s for s, _ in _loss_steps(first)] == [0, 1, 2] and _eval_steps(first) == {0: 0, 1: 3}
    assert yaml.safe_load((run / "logs/hparams.yaml").read_text())["model"]["lr"] == 0.003
    monkeypatch.delenv(FAULT_ENV)
    fit_main(_args(bench, run))
    again = _rows(run / "logs/resume-1/metrics.csv")
    assert _loss_steps(again) == [(3, "task2_mood/train/loss"), (4, "task2_mood/train/loss"),
                                  (5, "task2_mood/train/loss")]
    assert _eval_steps(again) == {2: 6}
    assert yaml.safe_load((run / "logs/resume-1/hparams.yaml").read_text())["model"]["lr"] == 0.003


def test_the_loggers_are_finalized_once_a_run(bench, tmp_path):
    FINALIZED.clear()
    run = tmp_path / "run"
    fit_main(_args(bench, run, "routing", *ROUTING, "--trainer.logger", f"{__name__}.CountingLogger",
                   "--trainer.logger.save_dir", str(run)))
    assert FINALIZED == ["success"]  # not once per phase's Trainer
    assert len(list(run.rglob("metrics.csv"))) == 1


def test_a_run_resumed_within_a_task_goes_on_from_the_run_wide_step(bench, tmp_path, monkeypatch):
    from mllm_cl.system.in_task import FAULT_STEP_ENV, InjectedStepFault

    run = tmp_path / "run"
    args = _args(bench, run, "routing", "--model.steps_per_task", "6", "--checkpoint_every_n_steps", "2",
                 "--model.method.init_args.gate_steps", "4", "--model.method.init_args.gate_batch", "8")
    monkeypatch.setenv(FAULT_STEP_ENV, "2/gate/2")  # task 1: 6 + 4 steps; task 2: 6 expert steps, then this
    with pytest.raises(InjectedStepFault):
        fit_main(args)
    # Steps 0-17 were taken; the last one's loss was not logged yet when the run stopped.
    assert [s for s, _ in _loss_steps(_rows(run / "logs/metrics.csv"))] == list(range(17))
    monkeypatch.delenv(FAULT_STEP_ENV)
    fit_main(args)
    again = _rows(run / "logs/resume-1/metrics.csv")
    assert _loss_steps(again) == [(18, "task2_mood/gate/loss"), (19, "task2_mood/gate/loss")]
    assert _eval_steps(again) == {2: 20}
