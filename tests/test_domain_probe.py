"""benchmarks/domain_probe.py and benchmarks/chance.py on a small CoIN-shaped benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_cl.data.synth import generate

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("coin")
    generate(out, suite="coin", train_size=20, test_size=10, progress=False)
    return out


def test_domain_probe_prints_both_confusion_matrices(bench, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/domain_probe.py"), str(bench), "--train", "20",
                           "--json", str(tmp_path / "probe.json")], capture_output=True, text=True, env=ENV,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "domains:" in done.stdout and "tasks:" in done.stdout
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["domains"] == ["charts", "signs", "digits", "shapes", "photos", "covers"]
    assert sum(map(sum, probe["by_domain"])) == 8 * 10 == sum(map(sum, probe["by_task"]))
    right = sum(probe["by_domain"][i][i] for i in range(6))
    assert probe["domain_accuracy"] == pytest.approx(100 * right / 80)
    # the shipped base tells its domains apart (the full measurement is in docs/synthetic.md)
    assert probe["domain_accuracy"] >= 90


def test_chance_names_the_best_constant_answer(bench, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/chance.py"), str(bench), "--json",
                           str(tmp_path / "chance.json")], capture_output=True, text=True, env=ENV, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((tmp_path / "chance.json").read_text())["tasks"]
    rows = json.loads((bench / "vqav2/test.json").read_text())
    counts = {}
    for r in rows:
        counts[r["answer"]] = counts.get(r["answer"], 0) + 1
    assert table["vqav2"]["chance"] == 100 * max(counts.values()) / len(rows)
    assert table["vqav2"]["bar"] == table["vqav2"]["chance"] + 30 and "describe" not in table
