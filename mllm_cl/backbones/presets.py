"""Tiny random backbones built from configuration, offline, in milliseconds.

They are real transformers / timm models with small widths, used by tests,
examples and the CPU quickstart. ``build_backbone`` is the one entry point:
a preset name (random weights from a seed) or a local directory written by
``ComposedMLLM.save_pretrained`` (loaded with ``from_pretrained``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mllm_cl.backbones.composed import ComposedMLLM
from mllm_cl.backbones.hf_mllm import HFMLLM, load_hf_mllm
from mllm_cl.backbones.tokenizer import byte_tokenizer
from mllm_cl.backbones.vision import HFVisionTower, TimmVisionTower, VisionTower


@dataclass
class Backbone:
    model: ComposedMLLM | HFMLLM
    tokenizer: PreTrainedTokenizerBase


@dataclass(frozen=True)
class Preset:
    vision: str  # clip | siglip | timm
    llm: str  # llama | qwen2
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_mlp: int | None = None  # the vision tower's MLP width (None: twice vision_width)
    vision_heads: int = 2
    llm_width: int = 128
    llm_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_positions: int = 512
    llm_mlp: int | None = None  # the LLM's MLP width (None: twice llm_width)
    vocab_size: int | None = None  # the LLM's vocabulary (None: the tokenizer's; larger ones leave rows unused)
    tie_embeddings: bool = True
    # With the usual 0.02, a 128-wide tied embedding caps logits near 2.5 after
    # the final RMSNorm, so a frozen random LLM cannot become confident
    # whatever its adapters learn (loss floors near 3 nats). 0.1 lifts the cap.
    init_std: float = 0.1


PRESETS: dict[str, Preset] = {
    "tiny-clip-llama": Preset(vision="clip", llm="llama"),
    "tiny-siglip-qwen2": Preset(vision="siglip", llm="qwen2"),
    "tiny-timm-llama": Preset(vision="timm", llm="llama"),
}


def _vision(p: Preset) -> VisionTower:
    common = dict(
        hidden_size=p.vision_width,
        intermediate_size=p.vision_mlp or 2 * p.vision_width,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
    )
    if p.vision == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel  # heavy: this family's code only

        return HFVisionTower(CLIPVisionModel(CLIPVisionConfig(**common)), feature_layer=-2, drop_cls=True)
    if p.vision == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel  # heavy: this family's code only

        return HFVisionTower(SiglipVisionModel(SiglipVisionConfig(**common)), feature_layer=-2, drop_cls=False)
    if p.vision == "timm":
        args = dict(img_size=p.image_size, patch_size=p.patch_size, embed_dim=p.vision_width,
                    depth=p.vision_layers, num_heads=p.vision_heads)
        if p.vision_mlp is not None:  # else timm's own ratio (4)
            args["mlp_ratio"] = p.vision_mlp / p.vision_width
        return TimmVisionTower("vit_tiny_patch16_224", args)
    raise ValueError(f"unknown preset vision {p.vision!r}")


def _llm(p: Preset, vocab_size: int, tokenizer: PreTrainedTokenizerBase, attn_implementation: str | None = None):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=p.llm_width,
        intermediate_size=p.llm_mlp or 2 * p.llm_width,
        num_hidden_layers=p.llm_layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=p.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=p.tie_embeddings,
        initializer_range=p.init_std,
    )
    if attn_implementation is not None:
        common["attn_implementation"] = attn_implementation
    if p.llm == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM  # heavy: this family's code only

        return LlamaForCausalLM(LlamaConfig(**common))
    if p.llm == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM  # heavy: this family's code only

        return Qwen2ForCausalLM(Qwen2Config(**common))
    raise ValueError(f"unknown preset llm {p.llm!r}")


def build_preset(name: str, *, seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None,
                 attn_implementation: str | None = None, **overrides) -> Backbone:
    """A random tiny backbone; the same name, seed and overrides give the same weights.

    ``overrides`` replace fields of the preset (``image_size``, ``llm_layers``, ``llm_width``, ...).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; presets: {', '.join(PRESETS)}")
    fields = set(Preset.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model.backbone_overrides: unknown preset field(s) {unknown}; fields: {sorted(fields)}")
    p = replace(PRESETS[name], **overrides)
    tokenizer = tokenizer or byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = _vision(p)
        llm = _llm(p, p.vocab_size or len(tokenizer), tokenizer, attn_implementation)
        # ``short``: the tiny configs' template, which ``mllm-cl pretrain`` trains the tiny bases with.
        model = ComposedMLLM(vision, llm, image_token_id=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
                             template="short")
    return Backbone(model=model, tokenizer=tokenizer)


def load_backbone(path: str | Path, *, torch_dtype: torch.dtype | None = None, image_size: int | None = None,
                  attn_implementation: str | None = None, device: torch.device | str | None = None) -> Backbone:
    """A backbone directory: one saved by ``ComposedMLLM.save_pretrained(path, tokenizer)`` (it holds
    ``mllm_cl.json``), or a transformers Llava / Qwen2-VL / Qwen2.5-VL checkpoint (``config.json``,
    tokenizer and image processor files); ``image_size`` applies to Qwen2-VL only. ``device``: where
    the weights are loaded to, straight from the files (``None``: the CPU)."""
    from transformers import AutoTokenizer  # heavy: transformers' auto classes load their code on first use

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"backbone directory {path} does not exist")
    if not (path / "mllm_cl.json").exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} holds neither mllm_cl.json (a ComposedMLLM) nor config.json "
                                    "(a transformers Llava / Qwen2-VL checkpoint)")
        model, tokenizer = load_hf_mllm(path, dtype=torch_dtype, image_size=image_size,
                                        attn_implementation=attn_implementation, device=device)
        return Backbone(model=model, tokenizer=tokenizer)
    if image_size is not None:
        raise ValueError(f"{path}: image_size applies to Qwen2-VL checkpoints only")
    model = ComposedMLLM.from_pretrained(path, torch_dtype=torch_dtype, attn_implementation=attn_implementation,
                                         device=device)
    tokenizer = AutoTokenizer.from_pretrained(path / "llm")
    return Backbone(model=model, tokenizer=tokenizer)


#: transformers' attention kernels, and the package each needs beyond transformers.
ATTENTION = {"sdpa": None, "eager": None, "flash_attention_2": "flash_attn"}


def check_attention(name: str | None) -> None:
    """A clear error for an unknown kernel or one whose package is not installed."""
    if name is None:
        return
    if name not in ATTENTION:
        raise ValueError(f"model.attn_implementation: unknown kernel {name!r}; choose one of {', '.join(ATTENTION)}")
    package = ATTENTION[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"model.attn_implementation: {name} needs the {package} package, which is not installed "
                         f"(pip install {package.replace('_', '-')}; it builds against your CUDA toolkit); "
                         "sdpa needs nothing more")


#: Pretrained backbones shipped inside the package, by name.
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
PACKAGED = {"tiny-base": _ASSETS / "tiny-base", "tiny-base-coin": _ASSETS / "tiny-base-coin"}
_PRETRAIN_CONFIG = {"tiny-base": "configs/pretrain_tiny.yaml", "tiny-base-coin": "configs/pretrain_coin.yaml"}


def build_backbone(preset: str | None = "tiny-clip-llama", *, path: str | None = None, seed: int = 0,
                   dtype: torch.dtype | None = None, image_size: int | None = None,
                   attn_implementation: str | None = None, overrides: dict | None = None,
                   device: torch.device | str | None = None) -> Backbone:
    """``path`` (a saved backbone directory) wins over ``preset``; ``tiny-base`` and
    ``tiny-base-coin`` are the pretrained tiny models shipped with the package (of the
    shape-scene and the CoIN-shaped suite; ``seed`` does not apply to them).
    ``dtype``: the frozen base weights' dtype (default: as saved, or float32 for presets).
    ``attn_implementation``: transformers' attention kernel (``sdpa``, ``eager``, ``flash_attention_2``).
    ``overrides``: fields of a random preset replaced (``llm_width``, ``llm_layers``, ...).
    ``device``: where the weights are made or loaded (``None``: the CPU); a random preset is
    initialised there, a saved one read straight onto it."""
    check_attention(attn_implementation)
    if overrides and (path is not None or preset in PACKAGED):
        raise ValueError("model.backbone_overrides apply to the random presets "
                         f"({', '.join(PRESETS)}), not to a saved or packaged backbone")
    if path is not None:
        return load_backbone(path, torch_dtype=dtype, image_size=image_size, attn_implementation=attn_implementation,
                             device=device)
    if image_size is not None:
        raise ValueError("image_size applies to Qwen2-VL checkpoints given by path only")
    if preset is None:
        raise ValueError("give a backbone `preset` or a `path`")
    if preset in PACKAGED:
        if not (PACKAGED[preset] / "mllm_cl.json").exists():
            raise FileNotFoundError(f"{PACKAGED[preset]} is missing; rebuild it with "
                                    f"`mllm-cl pretrain --config {_PRETRAIN_CONFIG[preset]}`")
        return load_backbone(PACKAGED[preset], torch_dtype=dtype, attn_implementation=attn_implementation,
                             device=device)
    with torch.device(device or "cpu"):  # parameters are created, and initialised, on the device
        built = build_preset(preset, seed=seed, attn_implementation=attn_implementation, **(overrides or {}))
    if dtype is not None:
        built.model.to(dtype)
    return built
