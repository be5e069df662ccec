"""The oracle (``route_by: task_id``) through the real loop: micro runs of routing, SAME and CRAM with and
without it store bit-identical trained tensors and method state; the oracle run restores and routes
by the true task (tests/methods/test_oracle_routing.py checks the routing itself)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mllm_cl.fit import main as fit_main
from mllm_cl.methods.base import ORACLE_ROUTER
from mllm_cl.system.restore import restore

ROOT = Path(__file__).resolve().parents[2]
EXTRA = {"routing": ["--model.method.init_args.gate_steps", "3", "--model.method.init_args.gate_batch", "null"],
         "same": [], "cram": ["--model.method.init_args.join_cosine", "0.0"]}


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_oracle_trains_the_same_tensors_and_restores(method, bench, tmp_path):
    runs = {}
    for route in (None, "task_id"):
        run = runs[route] = tmp_path / f"{method}-{route or 'own'}"
        fit_main(["--config", str(ROOT / "configs/micro.yaml"),
                  "--config", str(ROOT / f"configs/methods/{method}.yaml"),
                  "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run), *EXTRA[method],
                  *(["--model.method.init_args.route_by", route] if route else [])])
    own, oracle = (load_file(runs[r] / "checkpoints/task_02/adapters.safetensors") for r in runs)
    assert own.keys() == oracle.keys() and all(torch.equal(own[k], oracle[k]) for k in own)
    s_own, s_oracle = (json.loads((runs[r] / "checkpoints/task_02/structure.json").read_text()) for r in runs)
    assert s_own["method_state"] == s_oracle["method_state"]
    for name, layer in s_oracle["layers"].items():  # the oracle adds at most its parameter-free router
        routers = dict(layer["routers"])
        extra = routers.pop(ORACLE_ROUTER, None)
        assert routers == s_own["layers"][name]["routers"]
        assert extra is None or extra["class"] == "TaskRouter"
    restored = restore(runs["task_id"])  # the rebuilt structure matches the saved one
    assert restored.module.method.route_by == "task_id"
    dm = restored.datamodule
    batch = next(iter(dm.test_dataloader(1)))  # the second task's test prompts
    context = restored.module.method.routing_context(batch, training=False)
    assert context.task_ids.tolist() == [1] * len(batch["task_ids"])
