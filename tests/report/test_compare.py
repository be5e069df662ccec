"""examples/compare_methods: sweeps over orders and seeds through the real CLI, one table with the spread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, make_bench):
    colours = {"red": (210, 30, 30), "blue": (30, 40, 210)}
    tasks = {"colour": ("What colour is it?", lambda c: c), "mood": ("How does it feel?", lambda c: f"{c[0]}{c[0]}")}
    return make_bench(tmp_path_factory.mktemp("bench"), colours, tasks, train=8, test=3)


def _sweep(bench, runs, *args):
    cmd = [sys.executable, "examples/compare_methods/run.py", "--experiment", "configs/micro.yaml",
           "--methods", "zero_shot", "lora_ft", "--runs", str(runs), *args, "--", "--data.benchmark", str(bench)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_two_orders_and_two_seeds_make_one_table_with_the_spread(bench, tmp_path):
    runs = tmp_path / "compare"
    _sweep(bench, runs, "--order", "colour,mood", "--seed", "0")
    _sweep(bench, runs, "--order", "mood,colour", "--seed", "0")
    out = _sweep(bench, runs, "--order", "colour,mood", "--seed", "1")
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["colour-mood-s0", "colour-mood-s1", "mood-colour-s0"]
    order = json.loads((runs / "mood-colour-s0/lora_ft/results.json").read_text())["order"]
    assert order == ["mood", "colour"]
    table = (runs / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"zero_shot", "lora_ft"} and "| 3 |" in rows["lora_ft"]
    assert "(" in rows["lora_ft"].split("|")[5]  # MFN: mean (min–max) over the three sweeps
    for png in ("mfn_vs_params.png", "task_curves.png"):
        with Image.open(runs / png) as im:
            assert im.width > 400
    assert "lora_ft" in out
