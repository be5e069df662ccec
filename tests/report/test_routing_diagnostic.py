"""The routing diagnostic on a micro routing-CL run, against a hand computation from the gate scores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm_cl.experts import expert_layers, routing_context
from mllm_cl.report.routing import diagnose, load_predictions
from mllm_cl.system.restore import restore

ROOT = Path(__file__).resolve().parents[2]


def test_own_expert_shares_match_a_hand_computation_from_the_gates(run):
    restored = restore(run)
    diag = diagnose(restored, load_predictions(run, restored.stage), limit=3)
    module, dm = restored.module, restored.datamodule
    layers = expert_layers(module.model)
    for t, task in enumerate(dm.task_names):
        batch = dm.eval_collate([dm.test_dataset(t)[i] for i in range(3)])
        inputs = {}
        hooks = [layer.register_forward_hook(lambda m, a, out, name=name, inputs=inputs: inputs.__setitem__(name, a[0]))
                 for name, layer in layers.items()]
        mask = batch["attention_mask"]
        with torch.no_grad(), routing_context(module.model, module.method.routing_context(batch, training=False)):
            module.model(batch["input_ids"], attention_mask=mask, pixel_values=batch["pixel_values"],
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        for h in hooks:
            h.remove()
        for name, layer in layers.items():
            router = layer.routers["default"]
            top1 = router.scores(inputs[name]).argmax(-1)  # (B, L): by hand, from the gate vectors
            own = top1 == router.expert_names.index(f"task{t}")
            for kind, where in (("image", batch["image_mask"]), ("instruction", mask.bool() & ~batch["image_mask"])):
                expected = float(own[where].float().mean())
                got = diag["per_layer"][task][name][kind]["own_top1"]
                assert got == pytest.approx(expected, abs=1e-4), (task, name, kind)
    # the first task's prompts see only the first expert at stage 1: all its own
    first = diagnose(restore(run, 1), load_predictions(run, 1), limit=3)
    assert set(first["summary"]) == {"colour"}
    assert all(v["own_top1"] == 1.0 for v in first["summary"]["colour"].values())


def test_report_routing_writes_json_markdown_and_heatmap(run):
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "report", str(run), "--routing", "--limit", "2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    saved = json.loads((run / "routing/stage_02.json").read_text())
    assert saved["stage"] == 2 and set(saved["summary"]) == {"colour", "mood"}
    assert set(saved["summary"]["mood"]) == {"image", "instruction", "answer"}
    assert (run / "plots/routing_stage_02.png").stat().st_size > 1000
    assert "Share of tokens whose top-1 expert is the task's own" in out.stdout
