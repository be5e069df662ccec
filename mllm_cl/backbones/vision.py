"""Frozen vision encoders behind one small interface: images in, patch features out.

``VisionTower.forward(pixel_values) -> (n_images, num_tokens, hidden_size)``.
Two kinds: a transformers CLIP/SigLIP vision model (LLaVA-1.5 takes the
penultimate layer and drops CLS) and a timm ViT (prefix tokens dropped).
Both save to and load from a local directory with their libraries' own
loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    kind: str = ""
    image_size: int
    hidden_size: int
    num_tokens: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def save(self, directory: Path) -> dict:
        """Write weights under ``directory``; return the JSON that ``load_vision_tower`` takes."""
        raise NotImplementedError

    def spec(self) -> dict:
        return {"kind": self.kind, "mean": list(self.mean), "std": list(self.std)}


class HFVisionTower(VisionTower):
    """A transformers vision model (``CLIPVisionModel``, ``SiglipVisionModel``, ...).

    Args:
        model: the vision model.
        feature_layer: hidden-state index to take (LLaVA-1.5: -2, the penultimate).
        drop_cls: drop the first token (CLIP has a CLS token; SigLIP has none).
    """

    kind = "hf"

    def __init__(self, model: nn.Module, *, feature_layer: int = -2, drop_cls: bool = True) -> None:
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        cfg = model.config
        # SigLIP has no CLS token (and normalizes to [-1, 1]); CLIP has one.
        siglip = "siglip" in type(model).__name__.lower()
        self.has_cls = not siglip
        self.image_size = cfg.image_size
        self.hidden_size = cfg.hidden_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2 + int(self.has_cls and not drop_cls)
        if siglip:
            self.mean = self.std = (0.5, 0.5, 0.5)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]  # (n, 1 + P, d) for CLIP
        return feats[:, 1:] if self.drop_cls and self.has_cls else feats

    def save(self, directory: Path) -> dict:
        self.model.save_pretrained(directory)
        return {**self.spec(), "feature_layer": self.feature_layer, "drop_cls": self.drop_cls}


class TimmVisionTower(VisionTower):
    """A timm ViT; ``model_name`` and ``model_args`` rebuild it (``timm.create_model``)."""

    kind = "timm"

    def __init__(self, model_name: str, model_args: dict, *, checkpoint: str | None = None) -> None:
        super().__init__()
        import timm  # heavy, and needed by timm towers only

        if checkpoint is None:
            model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_args)
        else:  # timm's own pretrained loading path, pointed at a local file
            model = timm.create_model(
                model_name, pretrained=True, num_classes=0,
                pretrained_cfg_overlay={"file": str(checkpoint)}, **model_args,
            )
        self.model = model
        self.model_name, self.model_args = model_name, dict(model_args)
        self.image_size = model.patch_embed.img_size[0]
        self.hidden_size = model.num_features
        self.num_tokens = model.patch_embed.num_patches

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        feats = self.model.forward_features(pixel_values.to(dtype))  # (n, prefix + P, d)
        return feats[:, self.model.num_prefix_tokens:]

    def save(self, directory: Path) -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / "model.safetensors")
        return {**self.spec(), "model_name": self.model_name, "model_args": self.model_args}


def load_vision_tower(directory: Path, spec: dict) -> VisionTower:
    """Rebuild a tower saved by ``VisionTower.save`` from ``directory``."""
    kind = spec.get("kind")
    if kind == "hf":
        from transformers import AutoConfig, AutoModel  # heavy: transformers' auto classes load their code on first use

        config = AutoConfig.from_pretrained(directory)
        model = AutoModel.from_pretrained(directory, config=config)
        tower: VisionTower = HFVisionTower(model, feature_layer=spec["feature_layer"], drop_cls=spec["drop_cls"])
    elif kind == "timm":
        tower = TimmVisionTower(spec["model_name"], spec["model_args"], checkpoint=str(directory / "model.safetensors"))
    else:
        raise ValueError(f"{directory}: unknown vision tower kind {kind!r} (expected 'hf' or 'timm')")
    tower.mean, tower.std = tuple(spec["mean"]), tuple(spec["std"])
    return tower


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: not a directory written by mllm-cl's save_pretrained") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
