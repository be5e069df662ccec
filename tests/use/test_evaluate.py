"""``mllm-cl evaluate``: a finished run evaluated again under the oracle routing gives what a fit with
the oracle gives (matrix, metrics, general scores, the method's numbers, predictions), without training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_cl.errors import UserError
from mllm_cl.system.run_dir import ConfigMismatch, config_differences
from mllm_cl.use.evaluate import reevaluate

EXTRA = {"routing": ["--model.method.init_args.gate_steps", "3", "--model.method.init_args.gate_batch", "null"],
         "same": [], "cram": ["--model.method.init_args.join_cosine", "0.0"],
         "cmoe": ["--model.method.init_args.probe_steps", "2", "--model.method.init_args.vae_steps", "20"]}
ORACLE = ["--model.method.init_args.route_by", "task_id"]
WRITTEN_BY_EVALUATION = ("zero_shot", "matrix", "metrics", "general", "method_metrics", "tasks", "order", "params")


@pytest.fixture(scope="module")
def runs(fit_general, tmp_path_factory):
    """method -> (its run, the same config fitted with the oracle); made once per module."""
    root, made = tmp_path_factory.mktemp("runs"), {}

    def get(method):
        if method not in made:
            fit_general(root / method, method, *EXTRA[method])
            fit_general(root / f"{method}_oracle_fit", method, *EXTRA[method], *ORACLE)
            made[method] = root / method, root / f"{method}_oracle_fit"
        return made[method]
    return get


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_evaluating_a_run_with_the_oracle_equals_fitting_it_with_the_oracle(runs, method, tmp_path):
    run, fitted = runs(method)
    out = tmp_path / f"{method}_oracle"
    got = reevaluate(run, out, ORACLE, print_fn=lambda *a, **k: None)
    want = json.loads((fitted / "results.json").read_text())
    assert json.loads((out / "results.json").read_text()) == got
    for key in WRITTEN_BY_EVALUATION:
        assert got.get(key) == want.get(key), key
    assert got["general"]["retention"] and got["metrics"]["MFN"] is not None
    own = json.loads((run / "results.json").read_text())
    assert got["timings"]["tasks"][0]["phases"] == own["timings"]["tasks"][0]["phases"]  # its training, not ours
    assert got["reevaluated"]["from"] == str(run) and got["reevaluated"]["options"] == ORACLE
    assert sorted(got["reevaluated"]["changed"]) == [
        f"model.method.init_args.route_by: \"{own_route(run)}\" -> \"task_id\"",
        f"trainer.default_root_dir: \"{run}\" -> \"{out}\""]
    # The config is the one a fit of the oracle into OUT writes (only the folder differs from the fitted one's).
    assert config_differences((fitted / "config.yaml").read_text(), (out / "config.yaml").read_text()) == [
        f"trainer.default_root_dir: \"{fitted}\" -> \"{out}\""]
    for stage in ("stage_00", "stage_02"):
        for task in ("colour", "mood", "hue"):
            a = (out / "predictions" / stage / f"{task}.jsonl").read_text()
            assert a == (fitted / "predictions" / stage / f"{task}.jsonl").read_text(), (stage, task)
    assert not (out / "checkpoints").exists()  # no training, no weights of its own


def own_route(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]["method"]["init_args"]["route_by"]


def test_a_finished_evaluation_is_kept_and_another_config_in_out_is_refused(runs, tmp_path):
    run, _ = runs("cram")
    out = tmp_path / "oracle"
    lines = []
    first = reevaluate(run, out, ORACLE, print_fn=lines.append)
    again = reevaluate(run, out, ORACLE, print_fn=lines.append)
    assert again == first and "holds this evaluation already; kept" in lines[-1]
    with pytest.raises(ConfigMismatch, match="route_by"):
        reevaluate(run, out, [], print_fn=lines.append)


def test_options_that_change_training_and_unfinished_runs_are_refused(runs, tmp_path):
    run, _ = runs("cram")
    with pytest.raises(UserError, match=r"change what was trained(.|\n)*model.lr: 0.003 -> 0.1"):
        reevaluate(run, tmp_path / "lr", ["--model.lr", "0.1"], print_fn=lambda *a: None)
    with pytest.raises(UserError, match="is the run itself"):
        reevaluate(run, run, ORACLE, print_fn=lambda *a: None)
    with pytest.raises(UserError, match="not a finished run"):
        reevaluate(tmp_path / "nothing", tmp_path / "o", ORACLE, print_fn=lambda *a: None)


def test_the_command_line_evaluates_into_a_run_directory_the_report_reads(runs, tmp_path):
    run, _ = runs("cram")
    out = tmp_path / "clean"
    cmd = [sys.executable, "-m", "mllm_cl.cli", "evaluate", str(run), "--out", str(out), "--", "--score_mode", "clean"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "score_mode: \"official\" -> \"clean\"" in done.stdout and "evaluated again" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert {t["mode"] for t in results["tasks"]} == {"clean"}
    report = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0 and "cram" in report.stdout, report.stderr
