"""`mllm-cl report`: one table over runs, per-run report.md, CSV and readable plots."""

import json
import os
import subprocess
import sys

from PIL import Image

from mllm_cl.eval.continual_metrics import continual_metrics
from mllm_cl.system.run_dir import new_results


def _run(tmp_path, name, method, matrix):
    tasks = [{"name": n, "scorer": "exact_match", "mode": "official"} for n in ("shape", "colour", "count")]
    r = new_results(method=method, experiment="synth", seed=0, tasks=tasks, one_row=False)
    r.update(zero_shot=[10.0, 5.0, 0.0], matrix=matrix, metrics=continual_metrics(matrix, [10.0, 5.0, 0.0]),
             completed_tasks=3)
    r["params"]["trainable_per_task"] = [{"total": 1000, "by_kind": {"expert": 1000}}] * 3
    r["params"]["stored_per_task"] = [{"total": 1000 * (i + 1), "by_kind": {"expert": 1000 * (i + 1)}}
                                      for i in range(3)]
    r["timings"] = {"zero_shot_eval_s": 1.0, "tasks": [{"phases": {"train": 10.0}, "eval_s": 2.0}] * 3}
    run = tmp_path / name
    run.mkdir()
    (run / "results.json").write_text(json.dumps(r))
    return run


def test_report_table_files_and_plots(tmp_path):
    a = _run(tmp_path, "lora", "lora_ft", [[90.0, None, None], [20.0, 80.0, None], [0.0, 10.0, 70.0]])
    b = _run(tmp_path, "ind", "individual", [[90.0, None, None], [90.0, 80.0, None], [90.0, 80.0, 70.0]])
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "report", str(a), str(b)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:7] == ["run", "method", "MFT", "MFN", "MAA", "BWT", "forgetting"]
    lora = lines[2].split()
    # MFT (90+80+70)/3 = 80.0; MFN (0+10+70)/3 = 26.7; MAA (90 + 50 + 26.67)/3 = 55.6;
    # BWT ((0-90)+(10-80))/2 = -80.0; forgetting the same; time 1 + 3*12 = 37 s
    assert lora[:7] == ["lora", "lora_ft", "80.0", "26.7", "55.6", "-80.0", "80.0"] and "37s" in lora
    assert lines[3].split()[:6] == ["ind", "individual", "80.0", "80.0", "85.0", "0.0"]  # MAA (90+85+80)/3
    assert (a / "accuracy_matrix.csv").read_text().splitlines()[:2] == ["stage,shape,colour,count",
                                                                        "zero-shot,10.00,5.00,0.00"]
    report = (a / "report.md").read_text()
    assert "| after 2: colour | 20.0 | 80.0 | – |" in report and "plots/accuracy_matrix.png" in report
    for png in ("accuracy_matrix.png", "task_curves.png"):
        with Image.open(a / "plots" / png) as im:
            assert im.width > 400 and im.height > 300


def test_missing_run_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "results.json does not exist" in out.stderr


def test_report_shows_the_last_stages_routing_and_confusion(tmp_path):
    from mllm_cl.report.summary import markdown

    run = _run(tmp_path, "cmoe", "cmoe", [[90.0, None, None], [20.0, 80.0, None], [0.0, 10.0, 70.0]])
    results = json.loads((run / "results.json").read_text())
    results["method_metrics"] = {
        "stage_01": {"locator_accuracy": {"shape": 50.0}},
        "stage_03": {"locator_accuracy": {"shape": 100.0, "colour": 75.0, "count": 90.0},
                     "locator_confusion": {"shape": {"shape": 4}, "colour": {"shape": 1, "colour": 3},
                                           "count": {"count": 9, "colour": 1}}}}
    text = markdown(run, results)
    assert "## Routing at stage 03" in text
    assert "| locator_accuracy | 100.00 | 75.00 | 90.00 |" in text
    assert "| colour | 1 | 3 | 0 |" in text and "| count | 0 | 1 | 9 |" in text


def test_task_curves_draw_measured_points_only_dashed_across_skipped_stages(tmp_path):
    """A task is scored zero-shot and then first after its own training: the join across the
    stages in between is dashed, joins between consecutive stages are solid, no point is invented."""
    from mllm_cl.report.plots import draw_task_curves, plt

    r = json.loads((_run(tmp_path, "lora", "lora_ft", [[90.0, None, None], [20.0, 80.0, None],
                                                          [0.0, 10.0, 70.0]]) / "results.json").read_text())
    fig, ax = plt.subplots()
    labels = draw_task_curves(ax, r)
    plt.close(fig)
    assert labels == ["zero-shot", "after 1: shape", "after 2: colour", "after 3: count"]
    marks = [ln for ln in ax.get_lines() if ln.get_linestyle() == "None"]
    assert [list(m.get_xdata()) for m in marks] == [[0, 1, 2, 3], [0, 2, 3], [0, 3]]
    assert [list(m.get_ydata()) for m in marks] == [[10.0, 90.0, 20.0, 0.0], [5.0, 80.0, 10.0], [0.0, 70.0]]
    joins = {(tuple(ln.get_xdata()), ln.get_linestyle()) for ln in ax.get_lines() if ln.get_linestyle() != "None"}
    assert joins == {((0, 1), "-"), ((1, 2), "-"), ((2, 3), "-"), ((0, 2), "--"), ((2, 3), "-"), ((0, 3), "--")}
    colour_of = {tuple(ln.get_xdata()): ln.get_color() for ln in ax.get_lines() if ln.get_linestyle() == "--"}
    assert colour_of == {(0, 2): marks[1].get_color(), (0, 3): marks[2].get_color()}  # each join in its task's colour
    assert len({m.get_color() for m in marks}) == 3


def test_skipped_bad_input_gets_columns_only_where_a_run_skipped_any(tmp_path):
    matrix = [[90.0, None, None], [20.0, 80.0, None], [0.0, 10.0, 70.0]]
    a = _run(tmp_path, "skipped", "lora_ft", matrix)
    b = _run(tmp_path, "clean", "lora_ft", matrix)
    r = json.loads((a / "results.json").read_text())
    row = {"scored": 9, "skipped": 1, "reasons": {"corrupt image": 1}}
    r["bad_samples"] = {"train": {"shape": {"skipped": 2, "reasons": {"missing image": 2}}},
                        "eval": {"stage_02": {"shape": row},
                                 "stage_03": {"shape": row, "count": {**row, "skipped": 0}}}}
    (a / "results.json").write_text(json.dumps(r))
    def run(*dirs):
        return subprocess.run([sys.executable, "-m", "mllm_cl.cli", "report", "--no-plots", *map(str, dirs)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = run(b)
    assert out.returncode == 0 and "skipped" not in out.stdout.splitlines()[0]
    lines = run(a, b).stdout.splitlines()
    assert lines[0].split()[-4:] == ["train", "skipped", "test", "skipped"]
    assert lines[2].split()[-4:] == ["2", "1", "of", "19"]  # the last stage: 1 skipped, 9 + 9 scored
    report = (a / "report.md").read_text()
    assert "| training | shape | 2 | – | 2 x missing image |" in report
    assert "| stage_03 | shape | 1 | 9 | 1 x corrupt image |" in report and "| stage_03 | count |" not in report
