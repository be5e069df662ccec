"""Backbones: a frozen vision tower + projector + causal LM, transformers MLLMs from a local path,
tiny presets, offline tokenizers."""

from mllm_cl.backbones.composed import ComposedMLLM, projector
from mllm_cl.backbones.hf_mllm import (
    FAMILIES,
    HFMLLM,
    LlavaMLLM,
    Qwen2VLMLLM,
    load_hf_mllm,
)
from mllm_cl.backbones.presets import (
    PACKAGED,
    PRESETS,
    Backbone,
    build_backbone,
    build_preset,
    load_backbone,
)
from mllm_cl.backbones.tokenizer import byte_tokenizer, train_bpe_tokenizer
from mllm_cl.backbones.vision import HFVisionTower, TimmVisionTower, VisionTower

__all__ = [
    "FAMILIES",
    "HFMLLM",
    "PACKAGED",
    "PRESETS",
    "Backbone",
    "ComposedMLLM",
    "HFVisionTower",
    "LlavaMLLM",
    "Qwen2VLMLLM",
    "TimmVisionTower",
    "VisionTower",
    "build_backbone",
    "build_preset",
    "byte_tokenizer",
    "load_backbone",
    "load_hf_mllm",
    "projector",
    "train_bpe_tokenizer",
]
