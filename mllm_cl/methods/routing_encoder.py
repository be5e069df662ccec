"""``RoutingEncoder``: one frozen image feature and one instruction feature per sample, for routing.

Methods that route by what a sample *is* (SAME's task prior, CRAM's groups and
visual centroids) read these features, computed once per batch (never per
layer), without gradient, from a model that no expert touches. Two kinds,
selected in YAML (``model.method.init_args.routing_encoder``)::

    routing_encoder: {kind: backbone}                  # default: runs offline on any backbone
    routing_encoder: {kind: clip, path: /models/clip}  # the authors' setting: a local CLIPModel

- ``backbone``: the model's own frozen features. Image: its projected image
  features mean-pooled (what the LLM reads; vision tower and projector carry no
  experts). Instruction: the mean *input embedding* of the instruction's own text
  tokens (``batch["instruction"]``, tokenized without special tokens): no BOS, no
  chat-template words, no image placeholders. Why the instruction alone: the
  template's fixed words are the same in every task and dominate a mean over the
  whole prompt (on the canonical synthetic sequence four tasks' prompt means reach
  cosine 0.82-0.94; their questions alone 0.37-0.78). Input embeddings and not a
  forward through the LLM: they need no adapters disabled and cost one lookup.
- ``clip``: a transformers ``CLIPModel`` with its tokenizer and image processor
  from a local directory (nothing is downloaded): ``image_embeds`` of the sample's
  image and ``text_embeds`` of the instruction only (CLIP's 77-token limit), as the
  authors' code extracts them (they decode the prompt, drop the system line and cut
  at the assistant marker: ``batch["instruction"]`` is that text already). The
  batch's pixels (normalized for the backbone's tower; Qwen2-VL patches are put
  back into images) are mapped to CLIP's size and normalization.

Features come back raw (methods standardize or take cosines as their authors do),
in float32, on the batch's device. The encoder is not a submodule of the model: it
is not in the optimizer, not in the stored adapters and not counted in stored
parameters; a ``clip`` encoder follows the model's device and dtype when called.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("backbone", "clip")
CLIP_FILES = {"config.json": "the model's configuration",
              "preprocessor_config.json": "the image processor (size, mean, std)"}
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
CLIP_TOKENIZER = ("tokenizer.json", "vocab.json")
CLIP_MAX_TOKENS = 77


@dataclass
class RoutingFeatures:
    """image: (B, D_img), zeros where a sample has no image; text: (B, D_txt); has_image: (B,) bool."""

    image: torch.Tensor
    text: torch.Tensor
    has_image: torch.Tensor


class RoutingEncoder:
    """Frozen image and instruction features per sample, for routing (SAME's prior, CRAM's groups and centroids).

    Args:
        kind: ``backbone`` (the model's own frozen features) or ``clip`` (a local CLIPModel).
        path: the CLIP directory (``clip`` only): config.json, the weights, preprocessor_config.json
            and the tokenizer files, as ``save_pretrained`` writes them.
    """

    def __init__(self, kind: str = "backbone", *, path: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"routing_encoder.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "clip" and not path:
            raise ValueError("routing_encoder.kind clip needs routing_encoder.path: a local CLIPModel directory")
        if kind == "backbone" and path:
            raise ValueError("routing_encoder.path applies to kind clip only")
        self.kind, self.path = kind, path
        self.model: nn.Module | None = None  # the backbone
        self.tokenizer: Any = None
        self.clip: nn.Module | None = None
        self._clip_tokenizer: Any = None
        self._clip_pixels: tuple[int, torch.Tensor, torch.Tensor] | None = None  # size, mean, std

    def __repr__(self) -> str:
        return f"RoutingEncoder(kind={self.kind!r}" + (f", path={self.path!r})" if self.path else ")")

    # ------------------------------------------------------------------ setup
    def bind(self, model: nn.Module, tokenizer: Any) -> RoutingEncoder:
        """Attach to the backbone (and its tokenizer); a ``clip`` encoder loads its model here."""
        self.model, self.tokenizer = model, tokenizer
        if self.kind == "clip" and self.clip is None:
            self._load_clip()
        return self

    def _load_clip(self) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel  # heavy: for a clip encoder only

        root = Path(self.path)
        if not root.is_dir():
            raise FileNotFoundError(f"routing_encoder.path {root}: no such directory; expected a CLIPModel folder "
                                    f"written by save_pretrained ({', '.join([*CLIP_FILES, CLIP_WEIGHTS[0]])}, "
                                    "tokenizer files)")
        missing = [f"{name} ({what})" for name, what in CLIP_FILES.items() if not (root / name).is_file()]
        if not any((root / w).is_file() for w in CLIP_WEIGHTS):
            missing.append(f"{' or '.join(CLIP_WEIGHTS[:2])} (the weights)")
        if not any((root / t).is_file() for t in CLIP_TOKENIZER):
            missing.append(f"{' or '.join(CLIP_TOKENIZER)} (the tokenizer)")
        if missing:
            raise FileNotFoundError(f"routing_encoder.path {root} is not a complete CLIP directory; missing: "
                                    + "; ".join(missing))

        model_type = json.loads((root / "config.json").read_text()).get("model_type")
        if model_type != "clip":
            raise ValueError(f"routing_encoder.path {root}: config.json has model_type {model_type!r}, expected 'clip' "
                             "(a CLIPModel with both towers: image_embeds and text_embeds)")
        self.clip = CLIPModel.from_pretrained(root, local_files_only=True).eval().requires_grad_(False)
        self._clip_tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        proc = CLIPImageProcessor.from_pretrained(root, local_files_only=True)
        size = int(self.clip.config.vision_config.image_size)
        self._clip_pixels = (size, torch.tensor(proc.image_mean).view(1, 3, 1, 1),
                             torch.tensor(proc.image_std).view(1, 3, 1, 1))

    @property
    def image_dim(self) -> int:
        if self.kind == "clip":
            return int(self.clip.config.projection_dim)
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def text_dim(self) -> int:
        return self.image_dim  # both towers project to one space; the backbone's features are its width

    # ---------------------------------------------------------------- features
    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> RoutingFeatures:
        if self.model is None:
            raise RuntimeError("RoutingEncoder is not bound to a model: call bind(model, tokenizer) first")
        device = batch["input_ids"].device
        has = batch["has_image"].to(device).bool()
        if self.kind == "clip":
            self.clip.to(device=device, dtype=self._model_dtype())
            text = self._clip_text(batch["instruction"], device)
        else:
            text = self._backbone_text(batch["instruction"], device)
        image = text.new_zeros(has.shape[0], self.image_dim)
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.shape[0]:  # the images of the samples with one, in sample order
            feats = (self._clip_image(batch) if self.kind == "clip" else self._backbone_image(batch)).float()
            row = (has.long().cumsum(0) - 1).clamp(min=0)  # sample b's image: found on the device, not the host
            image = torch.where(has[:, None], feats.index_select(0, row), image)
        return RoutingFeatures(image=image, text=text, has_image=has)

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _backbone_text(self, instructions: list[str], device) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("routing_encoder kind backbone needs the backbone's tokenizer: bind(model, tokenizer)")
        rows = self.tokenizer(list(instructions), add_special_tokens=False)["input_ids"]  # one call per batch
        width = max(1, max(len(r) for r in rows))
        padded = torch.tensor([list(r) + [-1] * (width - len(r)) for r in rows], dtype=torch.long)  # -1: padding
        padded = padded.view(len(rows), width).to(device)  # the instructions' tokens: one copy to the device
        mask = padded >= 0
        ids = padded.clamp(min=0)
        tokens = self.model.get_input_embeddings()(ids).float()  # (B, W, D)
        return (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def _backbone_image(self, batch: dict[str, Any]) -> torch.Tensor:
        extra = {k: v for k, v in batch.get("model_inputs", {}).items() if k == "image_grid_thw"}
        return self.model.image_embeddings(batch["pixel_values"], **extra)

    def _clip_text(self, instructions: list[str], device) -> torch.Tensor:
        enc = self._clip_tokenizer(list(instructions), padding="longest", truncation=True, max_length=CLIP_MAX_TOKENS,
                                   return_tensors="pt", padding_side="right")
        out = self.clip.get_text_features(input_ids=enc["input_ids"].to(device),
                                          attention_mask=enc["attention_mask"].to(device))
        return _embeds(out).float()

    def _clip_image(self, batch: dict[str, Any]) -> torch.Tensor:
        pixels = self.backbone_images(batch)  # (n, 3, H, W) in [0, 1]
        size, mean, std = self._clip_pixels
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        pixels = (pixels.clamp(0, 1) - mean.to(pixels)) / std.to(pixels)
        return _embeds(self.clip.get_image_features(pixel_values=pixels.to(self._model_dtype())))

    def backbone_images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's images as (n, 3, H, W) in [0, 1]: the backbone's normalization undone
        (and Qwen2-VL's patches put back together)."""
        pixels = batch["pixel_values"].float()
        grid = batch.get("model_inputs", {}).get("image_grid_thw")
        if grid is not None:
            spec = self.model.data_spec().get("model_inputs")
            pixels = spec.unpatchify(pixels, grid)
        mean = torch.tensor(self.model.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.model.image_std, device=pixels.device).view(1, 3, 1, 1)
        return pixels * std + mean


def _embeds(out: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in older transformers, an output with ``pooler_output`` in newer."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("text_embeds", "image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")
