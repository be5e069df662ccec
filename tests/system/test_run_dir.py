"""RunDir's config check and finished runs, on real YAML text (no model)."""

import json

import pytest

from mllm_cl.system.run_dir import ConfigMismatch, RunDir, config_differences, new_results

SAVED = """# lightning.pytorch==2.6.6
seed_everything: 0
model:
  method:
    class_path: mllm_cl.methods.LoRAFineTune
    init_args:
      experts:
        target_modules: [q_proj, v_proj]
        rank: 8
  lr: 0.003
data:
  tasks:
  - name: colour
    train: a.json
  - name: mood
    train: b.json
"""


def test_differences_name_full_keys():
    now = (SAVED.replace("lr: 0.003", "lr: 0.01").replace("rank: 8", "rank: 4").replace("b.json", "c.json")
           .replace("[q_proj, v_proj]", "[q_proj]") + "experiment: other\n")
    assert config_differences(SAVED, now) == [
        'model.method.init_args.experts.target_modules: ["q_proj", "v_proj"] -> ["q_proj"]',
        "model.method.init_args.experts.rank: 8 -> 4",
        "model.lr: 0.003 -> 0.01",
        'data.tasks[1].train: "b.json" -> "c.json"',
        'experiment: (absent) -> "other"',
    ]


def test_check_config_refuses_another_config_and_ignores_comments(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.check_config(SAVED) is False and run.claim(SAVED) is False
    assert run.check_config(SAVED.replace("2.6.6", "2.7.0")) is True  # only the header comment differs
    with pytest.raises(ConfigMismatch, match=r"Differences \(saved -> now\):\n  model.lr: 0.003 -> 0.01$"):
        run.claim(SAVED.replace("lr: 0.003", "lr: 0.01"))


def test_finished_needs_every_task_and_the_final_metrics(tmp_path):
    run = RunDir(tmp_path)
    assert run.finished() is None
    results = new_results(method="lora_ft", experiment="x", seed=0, one_row=False,
                          tasks=[{"name": n, "scorer": "exact_match", "mode": "official"} for n in ("a", "b")])
    results["completed_tasks"] = 2
    run.save_results(results)
    assert run.finished() is None  # the last task is saved before the final metrics are
    results["metrics"] = {"MFN": 1.0}
    run.save_results(results)
    assert run.finished() == json.loads(run.results_path.read_text())
