"""examples/compare_methods: sweeps over orders and seeds through the real CLI, one table with the spread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, make_bench):
    colours = {"red": (210, 30, 30), "blue": (30, 40, 210)}
    return make_bench(tmp_path_factory.mktemp("bench"), colours, train=8, test=3)


def _sweep(bench, runs, *args):
    cmd = [sys.executable, "examples/compare_methods/run.py", "--experiment", "configs/micro.yaml",
           "--methods", "zero_shot", "lora_ft", "--runs", str(runs), *args, "--", "--data.benchmark", str(bench)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _row_names(table: Path) -> list[str]:
    return [line.split("|")[1].strip() for line in table.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")]


def test_two_orders_and_two_seeds_make_one_table_with_the_spread(bench, tmp_path):
    runs = tmp_path / "compare"
    _sweep(bench, runs, "--order", "colour,mood", "--seed", "0")
    _sweep(bench, runs, "--order", "mood,colour", "--seed", "0")
    out = _sweep(bench, runs, "--order", "colour,mood", "--seed", "1")
    sweeps = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert sweeps == ["colour-mood-s0", "colour-mood-s1", "mood-colour-s0"]
    order = json.loads((runs / "mood-colour-s0/lora_ft/results.json").read_text())["order"]
    assert order == ["mood", "colour"]
    table = (runs / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"zero_shot", "lora_ft"} and "| 3 |" in rows["lora_ft"]
    cells = [c.strip() for c in rows["lora_ft"].split("|")]
    assert "(" in cells[4] and "–" in cells[4]  # MFN: mean (min–max) over the three sweeps
    first = json.loads((runs / "colour-mood-s0/lora_ft/results.json").read_text())["matrix"]
    assert cells[7] == f"{first[0][0]:.0f} / {first[1][1]:.0f}"  # right after each task, first sweep
    assert rows["zero_shot"].split("|")[7].strip() == "–"  # one row: no diagonal
    for png in ("mfn_vs_params.png", "task_curves.png"):
        with Image.open(runs / png) as im:
            assert im.width > 400
    assert "lora_ft" in out


def test_ablations_run_each_row_with_its_overrides(bench, tmp_path):
    runs = tmp_path / "compare"
    _sweep(bench, runs, "--order", "colour,mood")
    cmd = [sys.executable, "examples/compare_methods/ablations.py", "--experiment", "configs/micro.yaml",
           "--only", "cram_no_penalty", "individual_attn_r9", "--runs", str(runs), "--",
           "--data.benchmark", str(bench), "--data.order", "[colour, mood]"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _row_names(runs / "ablations.md")
    assert rows == ["cram_no_penalty", "individual_attn_r9"]
    cram = yaml.safe_load((runs / "ablations/cram_no_penalty/config.yaml").read_text())["model"]["method"]
    assert cram["class_path"].endswith("CRAM") and cram["init_args"]["orth_weight"] == 0
    individual = yaml.safe_load((runs / "ablations/individual_attn_r9/config.yaml").read_text())["model"]["method"]
    experts = individual["init_args"]["experts"]["init_args"]
    assert experts["rank"] == 9 and experts["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    _sweep(bench, runs, "--compare-only")  # the sweeps' table leaves the ablations/ folder out
    rows = _row_names(runs / "comparison.md")
    assert rows == ["zero_shot", "lora_ft"]
