"""`mllm-cl fit`'s help and parse errors, through the command's own entry point (in this process:
these errors come before any model is built)."""

import lightning.pytorch  # noqa: F401 - imported at collection: its log handler binds the stderr of that moment,
import pytest  # not the stderr of the first test's capsys (closed for every later test)

from mllm_cl.cli import main

BASE = ["fit", "--config", "configs/micro.yaml", "--config", "configs/methods/lora_ft.yaml",
        "--data.benchmark", "unused"]


@pytest.fixture(autouse=True)
def _from_the_repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.delenv("MLLM_CL_DEBUG", raising=False)


def _error(capsys, *args):
    code = main([*BASE, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "usage:" not in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mllm-cl: error: ")]
    assert len(lines) == 1, err
    return err


def test_help_starts_with_fit_and_its_options_lightning_after(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("usage: ") and lines[0].endswith("fit --config EXPERIMENT.yaml [--config METHOD.yaml] "
                                                                 "[--KEY VALUE ...]")
    assert lines[2].startswith("Run a continual task sequence into a run directory")
    order = [text.index(title) for title in ("\n  --experiment", "\nModel (model.*)", "\n  --model.steps_per_task",
                                             "\nData (data.*)", "\n  --data.on_bad_sample",
                                             "\nLightning Trainer (trainer.*)", "\n  --trainer.accelerator")]
    assert order == sorted(order)
    assert "--ckpt_path" not in text and "--weights_only" not in text


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  lr: [0.1\n")
    err = _error(capsys, "--config", str(bad))
    assert f"mllm-cl: error: {bad}, line 2, column 7: not valid YAML: while parsing a flow sequence" in err


def test_an_unknown_key_names_its_file_and_the_nearest_valid_key(tmp_path, capsys):
    bad = tmp_path / "extra.yaml"
    bad.write_text("model:\n  step_per_task: 3\n")
    err = _error(capsys, "--config", str(bad))
    assert f"{bad}: unknown key `model.step_per_task`; did you mean `model.steps_per_task`?" in err
    err = _error(capsys, "--data.test_limt", "2")
    assert "unknown option `--data.test_limt`; did you mean `--data.test_limit`?" in err
    nested = tmp_path / "method.yaml"
    nested.write_text("model:\n  method:\n    init_args:\n      experts:\n        rnk: 4\n")
    err = _error(capsys, "--config", str(nested))
    assert f"{nested}: unknown key `model.method.init_args.experts.rnk`" in err
    assert "did you mean `model.method.init_args.experts.rank`?" in err


def test_a_wrong_type_names_the_key_and_where_it_was_set(tmp_path, capsys):
    assert "error: model.lr: expected float, got 'fast'" in _error(capsys, "--model.lr", "fast")
    bad = tmp_path / "lr.yaml"
    bad.write_text("model:\n  lr: fast\n")
    assert f"error: {bad}: model.lr: expected float, got 'fast'" in _error(capsys, "--config", str(bad))


def test_options_the_loop_would_ignore_are_refused(tmp_path, capsys):
    err = _error(capsys, "--ckpt_path", "last.ckpt")
    assert "mllm-cl fit does not take --ckpt_path: a run resumes from its own task checkpoints" in err
    cfg = tmp_path / "ckpt.yaml"
    cfg.write_text("weights_only: true\n")
    assert "mllm-cl fit does not take weights_only" in _error(capsys, "--config", str(cfg))
    err = _error(capsys, "--trainer.max_steps", "10", "--trainer.num_sanity_val_steps", "2")
    assert "trainer.max_steps (10): each phase's steps come from --model.steps_per_task" in err
    assert "trainer.num_sanity_val_steps (2)" in err


def test_a_missing_config_file_and_the_debug_variable(tmp_path, capsys, monkeypatch):
    err = _error(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert f"--config {tmp_path / 'nope.yaml'}: no such file" in err and "--debug" in err
    monkeypatch.setenv("MLLM_CL_DEBUG", "1")
    assert main([*BASE, "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "no such file" in err
