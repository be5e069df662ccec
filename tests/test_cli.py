"""The `mllm-cl` command as a user runs it: a real subprocess."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "mllm_cl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def test_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    for cmd in ("demo", "fit", "data", "report", "pretrain"):
        assert cmd in out.stdout


def test_help_texts_show_no_source_markup():
    for command in (["report"], ["data"], ["demo"], ["quickstart"], ["pretrain"]):
        out = _run(*command, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout, out.stderr
        assert "``" not in out.stdout, command
    assert "quickstart lands" not in _run("demo", "--help").stdout


def test_data_shard_writes_shards_with_a_progress_bar(tmp_path):
    import json

    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 16), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    records = [{"id": f"r{i}", "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]}
               for i in range(3)]
    records.append({"id": "bad", "image": "missing.png", "conversations": records[0]["conversations"]})
    (tmp_path / "train.json").write_text(json.dumps(records))
    out = _run("data", "shard", "--input", str(tmp_path / "train.json"), "--out", str(tmp_path / "shards"),
               "--shard-size", "2")
    assert out.returncode == 1 and "train.json, record 3: missing image: " in out.stderr
    out = _run("data", "shard", "--input", str(tmp_path / "train.json"), "--image-root", str(tmp_path),
               "--out", str(tmp_path / "shards"), "--shard-size", "2", "--on-bad-sample", "skip")
    assert out.returncode == 0, out.stderr
    assert "wrote 3 samples in 2 shards" in out.stdout and "(1 skipped)" in out.stdout
    assert "sharding train.json" in out.stderr and "1 x missing image" in out.stderr  # progress bar, skip report
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shards.json", "train-000000.tar",
                                                                       "train-000001.tar"]
    help_text = _run("data", "shard", "--help").stdout
    for option in ("--input", "--image-root", "--out", "--shard-size", "--on-bad-sample", "--quiet"):
        assert option in help_text


def test_demo_trains_experts_and_reports():
    out = _run("demo", "--steps", "40", "--experts", "3")
    assert out.returncode == 0, out.stderr
    assert "injected 6 expert layers under 'language_model'" in out.stdout
    assert "6 expert layers x 3 experts (top-2, rank 8)" in out.stdout
    first, last = out.stdout.split("loss ")[1].split(" (")[0].split(" -> ")
    assert float(last) < float(first)


def test_custom_router_example_selects_the_router_from_yaml():
    example = ROOT / "examples" / "custom_router"
    out = subprocess.run([sys.executable, str(example / "run.py"), "--config", str(example / "config.yaml")],
                         capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if ": CosineRouter -> " in line]
    assert len(lines) == 4  # q_proj and v_proj in both LLM layers
    assert all("shapes=" in line and "colours=" in line and "counts=" in line for line in lines)
