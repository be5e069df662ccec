"""General tasks: never trained, evaluated at the zero-shot row and after every task, reported apart."""

import json
from pathlib import Path

import pytest

from mllm_cl.fit import main as fit_main
from mllm_cl.system.loop import FAULT_ENV, InjectedFault

ROOT = Path(__file__).resolve().parents[2]
TASKS = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: f"{c[0]}{c[0]}"),
         "hue": ("Name the hue.", lambda c: f"a {c} hue")}


@pytest.fixture(scope="module")
def general_bench(tmp_path_factory, make_bench):
    colours = {"red": (210, 30, 30), "blue": (30, 40, 210), "green": (30, 180, 50)}
    return make_bench(tmp_path_factory.mktemp("general"), colours, TASKS, train=12, test=3)


def _fit(bench, run, method, *extra):
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / f"configs/methods/{method}.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), "--data.general", "[hue]",
              "--data.general_scorers", "[exact_match, token_f1]", *extra])
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize("method", ["lora_ft", "individual"])
def test_a_general_task_is_scored_at_every_stage_and_kept_out_of_the_matrix(general_bench, tmp_path, method):
    results = _fit(general_bench, tmp_path / method, method)
    assert results["order"] == ["colour", "mood"] and len(results["matrix"]) == 2  # not trained, not in the matrix
    general = results["general"]
    assert general["tasks"] == [{"name": "hue", "scorers": ["exact_match", "token_f1"]}]
    assert sorted(general["scores"]) == ["stage_00", "stage_01", "stage_02"]
    for stage, scores in general["scores"].items():
        assert set(scores["hue"]) == {"exact_match", "token_f1"}
        rows = (tmp_path / method / f"predictions/{stage}/hue.jsonl").read_text().splitlines()
        assert len(rows) == 3
    first, last = general["scores"]["stage_00"]["hue"], general["scores"]["stage_02"]["hue"]
    for scorer, retention in general["retention"]["hue"].items():
        assert retention == (round(last[scorer] / first[scorer], 4) if first[scorer] else None)
    if method == "individual":  # no expert belongs to a general task: the base alone, at every stage
        assert all(s == general["scores"]["stage_00"] for s in general["scores"].values())


def test_general_scores_survive_a_resume(general_bench, tmp_path, monkeypatch):
    whole = _fit(general_bench, tmp_path / "whole", "lora_ft")
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(InjectedFault):
        _fit(general_bench, tmp_path / "cut", "lora_ft")
    monkeypatch.delenv(FAULT_ENV)
    resumed = _fit(general_bench, tmp_path / "cut", "lora_ft")
    assert resumed["general"] == whole["general"] and resumed["matrix"] == whole["matrix"]


def test_general_names_are_checked(general_bench, tmp_path):
    with pytest.raises(ValueError, match="data.general"):
        _fit(general_bench, tmp_path / "bad", "lora_ft", "--data.general", "[sky]")
