"""Every YAML under configs/ parses with the fit CLI; experiment x method pairs instantiate."""

from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted((ROOT / "configs/methods").glob("*.yaml"))
PRETRAIN = ROOT / "configs/pretrain_tiny.yaml"  # `mllm-cl pretrain`'s configs, not fit experiments
EXPERIMENTS = [p for p in sorted((ROOT / "configs").glob("*.yaml")) if not p.name.startswith("pretrain_")]
EXPERIMENTS += sorted((ROOT / "configs/experiments").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_config_pairs_parse(experiment, method, capsys):
    with pytest.raises(SystemExit) as done:
        fit_main(["--config", str(experiment), "--config", str(method), "--data.benchmark", "unused",
                  "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: mllm_cl.methods." in printed and "seed_everything:" in printed


def test_all_method_configs_are_listed():
    assert {p.stem for p in METHODS} >= {"zero_shot", "lora_ft", "moelora", "multitask", "individual"}


def test_tiny_config_instantiates_model_and_data(tmp_path):
    from mllm_cl.fit import ContinualCLI, ContinualMLLM, TaskSequence

    cli = ContinualCLI(ContinualMLLM, TaskSequence, run=False, save_config_callback=None,
                       args=["--config", str(ROOT / "configs/tiny.yaml"), "--data.benchmark", str(tmp_path / "synth")])
    assert cli.datamodule.task_names == ["color", "classify"]
    assert (tmp_path / "synth/benchmark.json").exists()  # generated on first use
    assert cli.model.method.name == "lora_ft" and cli.model.budget.default.steps == 150


def test_pretrain_config_parses():
    from mllm_cl.pretrain import _parser

    cfg = _parser().parse_args(["--config", str(PRETRAIN)])
    assert cfg.steps == 3000 and cfg.geometry["image_size"] == 48 and cfg.suite == "shapes"
    coin = _parser().parse_args(["--config", str(ROOT / "configs/pretrain_coin.yaml")])
    assert coin.suite == "coin" and coin.out == "mllm_cl/assets/tiny-base-coin"
