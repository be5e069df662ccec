"""`mllm-cl predict` on finished micro runs: a task's test set reproduces the run's matrix (and its
predictions) exactly; one prompt prints its answer and the routing decision; broken runs are one message."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mllm_cl.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("method", ["lora_ft", "cmoe"])
def test_a_task_name_reproduces_the_last_row_and_its_predictions(micro_run, method, tmp_path, capsys):
    run = micro_run(method)
    results = json.loads((run / "results.json").read_text())
    for i, task in enumerate(results["order"]):
        out = tmp_path / f"{task}.jsonl"
        show = ["--show-routing", "2"] if method == "cmoe" else []  # the recorded forward changes no answer
        assert main(["predict", str(run), "--input", task, "--out", str(out), *show]) == 0
        printed = capsys.readouterr().out
        assert printed.count("choice: the task locator chose ") == (2 if method == "cmoe" else 0)
        assert f"score (exact_match, official): {results['matrix'][-1][i]}\n" in printed, printed
        assert _predictions(out) == _predictions(run / f"predictions/stage_02/{task}.jsonl")
    if method == "cmoe":  # the locator's choice, counted as the run's evaluation counts it
        assert "locator accuracy (%): " in printed


def test_an_earlier_stage_and_a_test_file_with_a_scorer(micro_run, use_bench, tmp_path, capsys):
    run = micro_run("lora_ft")
    results = json.loads((run / "results.json").read_text())
    out = tmp_path / "stage1.jsonl"
    assert main(["predict", str(run), "--stage", "1", "--input", str(use_bench / "colour_test.json"), "--out", str(out),
                 "--task", "colour", "--scorer", "exact_match"]) == 0
    assert f"score (exact_match, official): {results['matrix'][0][0]}\n" in capsys.readouterr().out
    assert _predictions(out) == _predictions(run / "predictions/stage_01/colour.jsonl")


@pytest.mark.parametrize("method", ["lora_ft", "cmoe"])
def test_one_prompt_prints_the_answer_and_the_routing_decision(micro_run, use_bench, method):
    run = micro_run(method)
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "predict", str(run), "--image",
                          str(use_bench / "images/red.png"), "--prompt", "What colour is it?", "--task", "colour"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    # the test set's first row is this image and question: the same answer as the run's evaluation
    # (--task colour: its generation budget; lora_ft and the locator ignore it otherwise)
    expected = _predictions(run / "predictions/stage_02/colour.jsonl")[0]["text"]
    assert f"answer: {expected}\n" in out.stdout
    lines = out.stdout.split("routing:\n", 1)[1].splitlines()
    groups = [line.split() for line in lines[2:]]
    assert [g[0] for g in groups] == [f"layers.{i}" for i in range(len(groups))] and groups
    if method == "lora_ft":
        assert "choice: none" in lines[0]
        assert all(g[1:] == ["shared", "1.00"] for g in groups)  # one expert, weight 1 everywhere
    else:
        assert "choice: the task locator chose " in lines[0]
        chosen = lines[0].split("(router ")[1].rstrip(")")
        for g in groups:  # top experts of the chosen task's router, weights of a top-k softmax
            weights = [float(w) for w in g[2::2]]
            assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1.0 + 1e-2
        assert chosen.startswith("task")


def _broken(run: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    edit(copy)
    return copy


def test_broken_runs_are_one_message_naming_the_file(micro_run, tmp_path, capsys):
    run = micro_run("lora_ft")
    assert main(["predict", str(run), "--stage", "5", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "stage 5 is not available; the run finished 2 task(s)" in err and "results.json" in err

    def moved(copy):
        config = yaml.safe_load((copy / "config.yaml").read_text())
        config["model"]["backbone_path"] = str(tmp_path / "gone")
        (copy / "config.yaml").write_text(yaml.safe_dump(config))

    copy = _broken(run, tmp_path, moved)
    assert main(["predict", str(copy), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'config.yaml'}: model.backbone_path {tmp_path / 'gone'} does not exist" in err
    assert "Traceback" not in err

    def other_version(copy):
        results = json.loads((copy / "results.json").read_text())
        results["schema_version"] = 99
        (copy / "results.json").write_text(json.dumps(results))

    shutil.rmtree(copy)
    copy = _broken(run, tmp_path, other_version)
    assert main(["predict", str(copy), "--prompt", "hi"]) == 2
    assert "has schema_version 99; this mllm-cl reads 1" in capsys.readouterr().err
    shutil.rmtree(copy)
    copy = _broken(run, tmp_path, lambda c: (c / "checkpoints/task_02/structure.json").unlink())
    assert main(["predict", str(copy), "--prompt", "hi"]) == 2
    assert "checkpoint task_02 is incomplete" in capsys.readouterr().err
    assert main(["predict", str(run), "--input", "nosuchtask", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "'nosuchtask' is not a task of this run; tasks: colour, mood" in capsys.readouterr().err
    assert main(["predict", str(run), "--input", "colour", "--out", str(tmp_path / "x.jsonl"), "--scorer", "nope"]) == 2
    assert "unknown --scorer 'nope'; scorers: " in capsys.readouterr().err


def test_a_method_routed_by_the_true_task_needs_the_task(micro_run, use_bench, capsys):
    run = micro_run("individual")
    image = str(use_bench / "images/blue.png")
    assert main(["predict", str(run), "--image", image, "--prompt", "How does it feel?"]) == 2
    err = capsys.readouterr().err
    assert "individual routes each sample by its true task; give --task NAME (one of colour, mood)" in err
    assert main(["predict", str(run), "--image", image, "--prompt", "How does it feel?", "--task", "mood"]) == 0
    printed = capsys.readouterr().out
    expected = _predictions(run / "predictions/stage_02/mood.jsonl")[1]["text"]  # row 1: blue, this question
    assert f"answer: {expected}\n" in printed and "choice: the true task, as given: mood" in printed
    assert all(line.split()[1:] == ["task1", "1.00"] for line in printed.splitlines() if line.startswith("    layers."))
