"""Tiny Llava, Qwen2-VL, InternVL and Qwen3-VL checkpoints on disk go through `mllm-cl fit` (micro config) and
`mllm-cl report`, through the real CLI in subprocesses, exactly as a user's local checkpoint directory would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mllm_cl.backbones.hf_tiny import BUILDERS

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "qwen3_vl"])
def test_local_checkpoint_fits_and_reports(bench, tmp_path, family):
    checkpoint = BUILDERS[family](tmp_path / family)
    run = tmp_path / "run"
    _cli("fit", "--config", "configs/micro.yaml", "--config", "configs/methods/moelora.yaml",
         "--data.benchmark", str(bench), "--trainer.default_root_dir", str(run),
         "--model.backbone_path", str(checkpoint), "--model.backbone_dtype", "bfloat16")
    results = json.loads((run / "results.json").read_text())
    assert results["completed_tasks"] == 2 and None not in results["matrix"][1]
    structure = json.loads((run / "checkpoints/task_02/structure.json").read_text())
    assert structure["backbone"]["path"] == str(checkpoint)
    assert structure["layers"] and all(".language_model." in name for name in structure["layers"])
    adapters = load_file(run / "checkpoints/task_02/adapters.safetensors")
    experts = [v for k, v in adapters.items() if ".experts." in k]
    assert experts and all(v.dtype.is_floating_point and v.element_size() == 4 for v in experts)  # fp32 over bf16
    predictions = (run / "predictions/stage_02/mood.jsonl").read_text().splitlines()
    assert len(predictions) == 3
    out = _cli("report", str(run))
    assert "moelora" in out.stdout and (run / "report.md").exists()
