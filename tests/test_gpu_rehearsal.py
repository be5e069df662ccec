"""benchmarks/gpu_rehearsal.py as a user runs it (a real subprocess): at tiny size on the CPU, every
method through `mllm-cl fit`, its table and its JSON; at full size without CUDA, a clear refusal."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_rehearsal.py"
METHODS = ["peft_lora", "lora_ft", "moelora", "individual", "routing", "same", "cram", "cmoe"]
NUMBERS = ("peak_gib", "step_s", "ratio_to_peft", "decode_tok_s", "run_s")


def rehearse(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def table_labels(stdout: str) -> list[str]:
    lines = stdout[stdout.index("method "):].splitlines()
    return [line.split("|")[0].strip() for line in lines[2:] if "|" in line]


def test_tiny_rehearsal_measures_every_method(tmp_path):
    out = tmp_path / "rehearsal.json"
    done = rehearse("--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "failed" not in done.stdout and "skipped" not in done.stdout, done.stdout

    labels = table_labels(done.stdout)
    for method in METHODS:
        assert any(label == method or label.startswith(f"{method}/") for label in labels), (method, labels)
    assert {"routing/expert", "routing/gate"} <= set(labels)  # both of routing's phases are rows

    report = json.loads(out.read_text())
    assert list(report["methods"]) == METHODS
    assert report["tiny"] and report["steps_per_task"] == 1
    assert [r["label"] for r in report["rows"]] == labels
    for row in report["rows"]:
        for key in NUMBERS:
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (row["label"], key, value)
    assert next(r for r in report["rows"] if r["method"] == "peft_lora")["ratio_to_peft"] == pytest.approx(1.0)

    for name, record in report["methods"].items():
        assert record["model_freed"], name  # one process, one method after another: nothing kept alive
        decode = record["decode"]
        assert decode["prompts"] == 4 and decode["new_tokens"] == 4 * 16, name  # 4 prompts x 16 new tokens
        assert record["argv"][:2] == ["mllm-cl", "fit"]
        assert {"--model.gradient_checkpointing", "--trainer.precision", "--model.load_device"} <= set(record["argv"])
        timings = record["timings"]["tasks"]
        assert len(timings) == 2, name  # both tasks ran, with their evaluations
        for phase in record["phases"].values():
            assert phase["tokens_per_sample"] > 16  # the 16 image tokens of the tiny tower, and the text
    assert set(report["methods"]["routing"]["phases"]) == {"expert", "gate"}
    assert set(report["methods"]["cmoe"]["phases"]) == {"train", "probe"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the full size would run")
def test_full_size_refuses_without_cuda(tmp_path):
    done = rehearse("--methods", "lora_ft", "--workdir", str(tmp_path / "work"), timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "--tiny" in done.stderr
    assert not (tmp_path / "work").exists()  # refused before anything was written
