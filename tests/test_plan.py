"""`mllm-cl plan` on the real 7B configs: a LLaVA-1.5-7B built from its config.json alone, CoIN's layout."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import write_benchmark

ROOT = Path(__file__).resolve().parents[1]
LLAVA = ROOT / "configs/backbones/llava-1.5-7b"


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllm_cl.cli", "plan", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    return write_benchmark(tmp_path_factory.mktemp("coin"), "coin")


def test_the_shipped_configs_give_the_published_parameter_counts():
    import transformers
    from transformers import AutoConfig

    for folder, cls, published in ((LLAVA, "LlavaForConditionalGeneration", 7_063_427_072),
                                   (ROOT / "configs/backbones/qwen2-vl-7b", "Qwen2VLForConditionalGeneration",
                                    8_291_375_616)):
        with torch.device("meta"):
            model = getattr(transformers, cls)._from_config(AutoConfig.from_pretrained(folder))
        assert sum(p.numel() for p in model.parameters()) == published, folder.name


@pytest.mark.parametrize("method", ["cram", "routing"])
def test_plan_of_llava_7b_on_coin_without_weights_or_gpu(coin, method):
    assert sorted(p.name for p in LLAVA.iterdir()) == ["config.json"]  # no weights, tokenizer or processor
    out = _plan("--config", "configs/experiments/coin_llava15_7b.yaml", "--config", f"configs/methods/{method}.yaml",
                "--model.backbone_path", str(LLAVA), "--data.root", str(coin))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "parameters: base 7.063B" in text
    rows = [line.split() for line in text.splitlines() if re.match(r"\s+\d+ \w", line)]
    assert [r[1] for r in rows] == ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2",
                                    "OCRVQA"]
    # 3 training samples per task, 8 processes x 16: one micro-batch an epoch, one step of 128 samples
    assert all(r[2] == "3" and r[3:5] == ["1", "epoch"] for r in rows)
    if method == "routing":  # the expert phase (1 epoch) and the gate phase's own 100 steps of 1024 samples
        assert all("expert 1 x 128, gate 100 x 1024" in line for line in text.splitlines()
                   if re.match(r"\s+\d+ \w", line))
    else:  # CRAM's two phases split the task's one step: 5% of it is still one step
        assert all("warmup 1 x 128, stable 1 x 128" in line for line in text.splitlines()
                   if re.match(r"\s+\d+ \w", line))
    assert "evaluation: " in text and "0: 16" in text  # 8 tasks x 2 test prompts at the zero-shot row
    peak = float(re.search(r"estimated peak memory per GPU: ([\d.]+) GiB", text).group(1))
    assert 13 < peak < 40  # a bf16 7B base (13.2 GiB) and 16 x 2048 tokens, checkpointed


def test_plan_needs_the_process_count(coin):
    out = _plan("--config", "configs/experiments/coin_llava15_7b.yaml", "--config", "configs/methods/lora_ft.yaml",
                "--model.backbone_path", str(LLAVA), "--data.root", str(coin), "--trainer.devices", "auto")
    assert out.returncode == 2 and "give the number of GPUs the run will use" in out.stderr


def test_plan_reads_no_weights():
    """A folder with only config.json is enough: nothing else is opened to build the skeleton."""
    from mllm_cl.backbones import build_backbone

    built = build_backbone(path=str(LLAVA), dtype=torch.bfloat16, device="meta")
    assert built.tokenizer is None and built.model.image_size == 336 and built.model.num_image_tokens == 576
    assert {p.device.type for p in built.model.parameters()} == {"meta"}
    assert json.loads((LLAVA / "config.json").read_text())["text_config"]["vocab_size"] == 32064
