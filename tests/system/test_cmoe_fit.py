"""LLaVA-CMoE end to end on the micro config: growth, frozen old experts, per-task routers, the locator."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm_cl.fit import main as fit_main
from mllm_cl.methods.cmoe import layers_to_grow

ROOT = Path(__file__).resolve().parents[2]


def test_cmoe_grows_freezes_and_locates(bench, tmp_path):
    run = tmp_path / "cmoe"
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/cmoe.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run),
              "--model.method.init_args.probe_steps", "3", "--model.method.init_args.vae_steps", "20",
              "--model.method.init_args.alpha", "0.5"])
    results = json.loads((run / "results.json").read_text())
    s1 = json.loads((run / "checkpoints/task_01/structure.json").read_text())
    s2 = json.loads((run / "checkpoints/task_02/structure.json").read_text())
    layers = list(s1["layers"])
    # Task 1: every layer grows one expert, covered by the task's router.
    assert layers and all(s1["layers"][n]["experts"] == {"t0e0": 8} for n in layers)
    assert all(s1["layers"][n]["routers"] == {"task0": {"class": "TopKRouter", "experts": ["t0e0"]}} for n in layers)
    # Task 2: exactly the layers above mean - alpha * std of the probe frequencies grow.
    freqs = s2["method_state"]["probe_frequencies"]["1"]
    grown = layers_to_grow(freqs, 0.5)
    assert sorted(grown) == s2["method_state"]["grown"]["1"] and 0 < len(grown) < len(layers)
    for n in layers:
        experts = ["t0e0", "t1e0"] if n in grown else ["t0e0"]
        assert list(s2["layers"][n]["experts"]) == experts
        # Each task's router covers exactly the experts that existed at its task.
        assert s2["layers"][n]["routers"]["task0"]["experts"] == ["t0e0"]
        assert s2["layers"][n]["routers"]["task1"]["experts"] == experts
    # Old experts and the old task's routers never change.
    a1 = load_file(run / "checkpoints/task_01/adapters.safetensors")
    a2 = load_file(run / "checkpoints/task_02/adapters.safetensors")
    assert a1 and all(torch.equal(a1[k], a2[k]) for k in a1)
    assert any(".t1e0." in k for k in a2) and any(".routers.task1." in k for k in a2)
    # The locator's accuracy per stage and seen task is its own metric.
    own = results["method_metrics"]
    assert set(own) == {"stage_01", "stage_02"}
    assert set(own["stage_01"]["locator_accuracy"]) == {"colour"}
    assert set(own["stage_02"]["locator_accuracy"]) == {"colour", "mood"}
    assert all(0 <= v <= 100 for v in own["stage_02"]["locator_accuracy"].values())
    phases = [set(t["phases"]) for t in results["timings"]["tasks"]]
    assert phases == [{"train"}, {"probe", "train"}]
