"""CRAM end to end on the micro config: phases, adaptive-rank slots, groups, frozen old slots, stored sizes."""

import csv
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mllm_cl.fit import main as fit_main

ROOT = Path(__file__).resolve().parents[2]


def test_cram_instantiates_slots_freezes_them_and_stores_effective_ranks(bench, tmp_path):
    run = tmp_path / "cram"
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/cram.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), "--model.steps_per_task", "20",
              "--model.method.init_args.join_cosine", "0.0"])  # both tasks in one group: the penalty applies
    results = json.loads((run / "results.json").read_text())
    assert [set(t["phases"]) for t in results["timings"]["tasks"]] == [{"warmup", "stable"}] * 2
    s2 = json.loads((run / "checkpoints/task_02/structure.json").read_text())
    slots = s2["method_state"]["slots"]
    assert slots["0"]["group"] == slots["1"]["group"] == 0
    for name, layer in s2["layers"].items():
        assert set(layer["experts"]) == {"t0", "t1"}  # the buffer is not stored
        assert all(4 <= r <= 9 for r in layer["experts"].values())
        assert layer["experts"]["t1"] == slots["1"]["ranks"][name]
        assert layer["routers"] == {"group0": {"class": "CentroidRouter", "experts": ["t0", "t1"]}}
    # Stored parameters are the slots at their effective ranks (+ the centroids), not r_max.
    adapters = load_file(run / "checkpoints/task_02/adapters.safetensors")
    stored = sum(t.numel() for k, t in adapters.items() if ".experts." in k)
    assert results["params"]["stored_per_task"][1]["by_kind"]["expert"] == stored
    at_rmax = sum(9 * (adapters[k].shape[1] + adapters[k[:-1] + "B"].shape[0]) for k in adapters
                  if ".experts." in k and k.endswith(".A"))
    assert stored < at_rmax
    # The second slot shares the group with the first: the orthogonality penalty is on, and positive.
    with open(run / "logs/metrics.csv") as f:
        penalty = [float(r["task2_mood/stable/extra_loss"]) for r in csv.DictReader(f)
                   if r.get("task2_mood/stable/extra_loss")]
    assert penalty and all(p > 0 for p in penalty)
    # Older slots and their centroids are bit-identical after the next task.
    a1 = load_file(run / "checkpoints/task_01/adapters.safetensors")
    old = [k for k in a1 if ".t0." in k or k.endswith("centroids.t0")]
    assert old and all(torch.equal(a1[k], adapters[k]) for k in old)
    own = results["method_metrics"]["stage_02"]
    assert own["groups"] == {"colour": 0, "mood": 0} and set(own["slot_ranks"]) == {"colour", "mood"}
    assert set(own["group_accuracy"]) == {"colour", "mood"}


def test_cram_runs_with_a_clip_routing_encoder(bench, tmp_path):
    from mllm_cl.backbones.hf_tiny import tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    run = tmp_path / "cram-clip"
    fit_main(["--config", str(ROOT / "configs/micro.yaml"), "--config", str(ROOT / "configs/methods/cram.yaml"),
              "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run),
              "--model.method.init_args.routing_encoder.kind", "clip",
              "--model.method.init_args.routing_encoder.path", str(clip)])
    results = json.loads((run / "results.json").read_text())
    assert results["completed_tasks"] == 2
    adapters = load_file(run / "checkpoints/task_02/adapters.safetensors")
    centroids = [t for k, t in adapters.items() if ".centroids." in k]
    assert centroids and all(t.shape == (16,) for t in centroids)  # CLIP's projection width, not the LLM's
    assert not any("clip" in k.lower() for k in adapters)  # the encoder is not stored
    assert set(results["method_metrics"]["stage_02"]["group_accuracy"]) == {"colour", "mood"}
