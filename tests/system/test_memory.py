"""benchmarks/memory.py's counts on a narrow model: what the memory goals at 7B width rest on."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
memory = pytest.importorskip("memory")


@pytest.fixture(scope="module")
def rows():
    args = argparse.Namespace(width=128, mlp=344, heads=4, vocab=32064, tokens=256, answer=16, batch=1,
                              methods=["lora_ft", "same"])
    return {r["method"]: r for r in memory.activation_rows(args)}, args


def test_a_bf16_base_keeps_no_second_copy(rows):
    """lora_ft over a bf16 base under bf16 autocast keeps what PEFT's LoRA keeps (within 5%): no cast
    copy of a frozen weight, no second copy of a layer's input."""
    by, _ = rows
    ratio = by["lora_ft"]["plain"]["layer"] / by["PEFT LoRA"]["plain"]["layer"]
    assert 0.95 <= ratio <= 1.05, ratio


def test_checkpointing_keeps_only_each_layers_bf16_input(rows):
    by, args = rows
    for name in ("lora_ft", "same", "PEFT LoRA"):
        assert by[name]["checkpointed"]["layer"] == pytest.approx(2 * args.width, rel=0.01), name
        assert by[name]["checkpointed"]["layer"] < by[name]["plain"]["layer"] / 4, name


def test_the_loss_keeps_a_fraction_of_the_full_logits(rows):
    """At a 32k vocabulary, the head's bytes per token with logits at the supervised positions only are
    under 10% of those of the full (batch, length, vocab) logits."""
    lora = rows[0]["lora_ft"]
    assert lora["plain"]["rest"] <= 0.10 * lora["full_logits"]["rest"]
