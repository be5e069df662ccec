"""General tasks: never trained, evaluated at the zero-shot row and after every task, reported apart."""

import pytest

from mllm_cl.system.loop import FAULT_ENV, InjectedFault


@pytest.mark.parametrize("method", ["lora_ft", "individual"])
def test_a_general_task_is_scored_at_every_stage_and_kept_out_of_the_matrix(fit_general, tmp_path, method):
    results = fit_general(tmp_path / method, method)
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


def test_general_scores_survive_a_resume(fit_general, tmp_path, monkeypatch):
    whole = fit_general(tmp_path / "whole", "lora_ft")
    monkeypatch.setenv(FAULT_ENV, "1")
    with pytest.raises(InjectedFault):
        fit_general(tmp_path / "cut", "lora_ft")
    monkeypatch.delenv(FAULT_ENV)
    resumed = fit_general(tmp_path / "cut", "lora_ft")
    assert resumed["general"] == whole["general"] and resumed["matrix"] == whole["matrix"]


def test_general_names_are_checked(fit_general, tmp_path):
    with pytest.raises(ValueError, match="data.general"):
        fit_general(tmp_path / "bad", "lora_ft", "--data.general", "[sky]")
