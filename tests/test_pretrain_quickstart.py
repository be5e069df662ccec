"""`mllm-cl pretrain` and `mllm-cl quickstart` on micro settings (the real ones take minutes)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from mllm_cl.backbones import PACKAGED, build_backbone
from mllm_cl.quickstart import verdict

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _pretrain(config: str, out, *, steps: int, captions: int, eval_samples: int) -> dict:
    """A micro `mllm-cl pretrain` run in a subprocess; its pretrain.json."""
    done = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "pretrain", "--config", config, "--out", str(out),
                           "--steps", str(steps), "--captions", str(captions), "--single_object_steps", str(steps // 2),
                           "--eval_samples", str(eval_samples), "--batch_size", "4"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "pretrain.json").read_text())


def test_pretrain_writes_a_loadable_base(tmp_path):
    record = _pretrain("configs/pretrain_tiny.yaml", tmp_path / "base", steps=6, captions=64, eval_samples=4)
    assert record["config"]["steps"] == 6 and "held_out_caption_exact_match" in record
    base = build_backbone(path=str(tmp_path / "base"))
    assert base.model.num_image_tokens == 9 and base.model.image_size == 48
    assert len(base.tokenizer) == 400 and base.tokenizer(" red circle").input_ids  # BPE trained on synthetic text


def test_pretrain_the_coin_suite_base_reports_every_domain(tmp_path):
    record = _pretrain("configs/pretrain_coin.yaml", tmp_path / "base", steps=4, captions=48, eval_samples=60)
    assert record["config"]["suite"] == "coin"
    assert set(record["held_out_caption_exact_match_by_domain"]) == {
        "charts", "signs", "digits", "shapes", "photos", "covers"}
    base = build_backbone(path=str(tmp_path / "base"))
    assert base.tokenizer("What is the title of this book?").input_ids  # BPE trained on the suite's text


def test_the_shipped_base_loads():
    for name in ("tiny-base", "tiny-base-coin"):
        base = build_backbone(name)
        assert (PACKAGED[name] / "pretrain.json").exists()
        ids = torch.tensor([[base.tokenizer.bos_token_id] + [base.tokenizer.image_token_id] * 9])
        assert base.model(ids, pixel_values=torch.zeros(1, 3, 48, 48)).logits.shape[-1] == len(base.tokenizer)
    assert json.loads((PACKAGED["tiny-base-coin"] / "pretrain.json").read_text())["config"]["suite"] == "coin"


def test_the_summary_line_says_who_forgets():
    results = [{"method": "lora_ft", "metrics": {"MFN": 14.0, "BWT": -62.3}},
               {"method": "cmoe", "metrics": {"MFN": 56.0, "BWT": 0.0}},
               {"method": "multitask", "metrics": {"MFN": 55.0, "BWT": None}}]
    assert verdict(results) == ("lora_ft forgets its earlier tasks (MFN 14.0, BWT -62.3); "
                                "cmoe keeps its tasks (MFN 56.0, BWT +0.0); multitask has no BWT (a single stage).")


def test_quickstart_runs_two_methods_and_compares_them(tmp_path):
    experiment = tmp_path / "micro.yaml"
    experiment.write_text((ROOT / "configs/experiments/synth.yaml").read_text()
                          .replace("benchmark: data/synth", f"benchmark: {tmp_path / 'synth'}")
                          .replace("tasks: [color, classify, count, ocr, caption]", "tasks: [color, count, caption]")
                          .replace("order: [color, classify, count, ocr]", "order: [color, count]")
                          .replace("train_size: 1000", "train_size: 16").replace("test_size: 100", "test_size: 4"))
    out = subprocess.run([sys.executable, "-m", "mllm_cl.cli", "quickstart", "--experiment", str(experiment),
                          "--runs", str(tmp_path / "runs"), "--steps", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lora_ft:" in out.stdout and "cmoe:" in out.stdout and "quickstart finished" in out.stdout
    assert re.search(r"^lora_ft (forgets its earlier tasks|keeps its tasks) \(MFN [\d.]+, BWT [-+][\d.]+\); "
                     r"cmoe (forgets its earlier tasks|keeps its tasks) \(MFN", out.stdout, re.M), out.stdout[-2000:]
    assert "phase train, 2 steps" in out.stdout  # --steps sets the task budget the method's phases share
    for method in ("lora_ft", "cmoe"):
        run = tmp_path / "runs" / f"quickstart-{method}"
        assert (run / "report.md").exists() and (run / "plots/accuracy_matrix.png").exists()
