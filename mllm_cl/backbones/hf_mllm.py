"""Whole transformers MLLMs from a local directory: LLaVA-1.5 (``Llava``), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL.

The directory is what ``save_pretrained`` writes for the model, its tokenizer
and its image processor (a hub snapshot such as ``llava-hf/llava-1.5-7b-hf`` or
``Qwen/Qwen2-VL-2B-Instruct``, copied to disk). It is loaded with transformers'
own classes and wrapped in ``HFMLLM``, which gives the rest of mllm-cl the
same interface as ``ComposedMLLM``:

- ``forward(input_ids, attention_mask, pixel_values, labels, **model_inputs)``
  with 1-D ``position_ids`` and a KV cache for greedy decoding;
- ``image_size`` / ``image_mean`` / ``image_std`` for our image processor
  (LLaVA-1.5's pad-to-square recipe);
- ``data_spec()``: image placeholders per image, the placeholder id, the tokens
  around an image, the collation object for model-specific inputs, and the chat
  template the model was tuned with (``data.template: auto``): LLaVA-1.5
  ``vicuna_v1``, the others ``hf`` (the tokenizer's own ``chat_template``).

Experts go into the language model only (``hf.model.language_model``); the
vision tower and projector stay frozen.

InternVL (``InternVLForConditionalGeneration``, InternVL3 in transformers' format) reads one
448 px tile per image (the tower's size), not its dynamic tiling [choice]; the pixel
shuffle's tokens are wrapped in the tokenizer's ``<img>`` / ``</img>``, as its processor does.

Qwen2-VL reads images at one fixed square size here (``image_size``, a multiple
of 28), not at its native dynamic resolution: every image of a batch then has
the same number of tokens [choice].
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import transformers
from torch import nn

from mllm_cl.backbones.checkpointing import set_activation_checkpointing
from mllm_cl.backbones.kv_cache import cache_kwargs, take_cache
from mllm_cl.backbones.loading import load_options
from mllm_cl.data.model_inputs import Qwen2VLInputs
from mllm_cl.experts import expert_layers

log = logging.getLogger(__name__)

#: ``config.json`` model_type -> transformers class name.
FAMILIES = {
    "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}

#: Qwen2-VL's default image side when the processor allows larger ones (256 image tokens).
QWEN_DEFAULT_SIDE = 448


class HFMLLM(nn.Module):
    """A transformers MLLM behind the interface of ``ComposedMLLM``.

    Args:
        model: the ``...ForConditionalGeneration`` model.
        image_size: side of the square images fed to the vision tower.
        image_mean, image_std: normalization of the model's image processor.
    """

    #: The chat template ``data.template: auto`` takes: ``hf``, the tokenizer's own ``chat_template``.
    template = "hf"

    def __init__(self, model: nn.Module, *, image_size: int, image_mean, image_std) -> None:
        super().__init__()
        self.hf = model
        self.family = model.config.model_type
        self.image_size = image_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.hf.requires_grad_(False)

    @property
    def config(self):
        return self.hf.config

    @property
    def image_token_id(self) -> int:
        return self.hf.config.image_token_id

    @property
    def num_image_tokens(self) -> int:
        raise NotImplementedError

    def data_spec(self) -> dict:
        return {"num_image_tokens": self.num_image_tokens, "image_token_id": self.image_token_id,
                "template": self.template}

    def get_input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def image_embeddings(self, pixel_values: torch.Tensor, **model_inputs) -> torch.Tensor:
        """(n_images, llm_hidden): each image's projected features, mean-pooled (what the LLM reads)."""
        out = self._image_features(pixel_values.to(self._vision_dtype()), **model_inputs).pooler_output
        return torch.stack([f.reshape(-1, f.shape[-1]).mean(0) for f in out])

    def _image_features(self, pixel_values, **model_inputs):
        return self.hf.model.get_image_features(pixel_values=pixel_values)

    def _vision_dtype(self) -> torch.dtype:
        return self.hf.model.vision_tower.dtype

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, *, hidden_only: bool = False,
                **kwargs):
        """As ``ComposedMLLM.forward``: ``hidden_only`` runs the model without its output head."""
        if pixel_values is not None:
            pixel_values = pixel_values.to(self._vision_dtype())
        cache = take_cache(kwargs)  # `cache` or `past_key_values`: handed on under the name the model takes
        if hidden_only:
            if labels is not None:
                raise ValueError("hidden_only returns no loss: apply output_head to the positions that need it")
            return self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                      **cache_kwargs(self.hf, cache), **kwargs)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels,
                       **cache_kwargs(self.hf, cache), **kwargs)

    @property
    def output_head(self) -> nn.Module:
        return self.hf.get_output_embeddings()

    @property
    def text_decoder(self) -> nn.Module:
        """The language model's decoder stack (its ``norm`` is the final norm before ``output_head``)."""
        return self.hf.base_model.language_model

    def set_checkpointing(self, enabled: bool, *, context_fn=None) -> None:
        """Activation checkpointing of the model's decoder layers (and of its vision tower's, which keep
        nothing for backward while it is frozen)."""
        set_activation_checkpointing(self.hf, enabled, context_fn=context_fn)

    def save_pretrained(self, directory: str | Path) -> None:
        if expert_layers(self):
            raise RuntimeError("save_pretrained saves the base model only; this model has expert layers injected")
        self.hf.save_pretrained(directory)


class LlavaMLLM(HFMLLM):
    """``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP ViT-L/336, 2-layer MLP projector, Vicuna)."""

    template = "vicuna_v1"  # LLaVA-1.5's conv_vicuna_v1

    @property
    def num_image_tokens(self) -> int:
        v = self.hf.config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        full = self.hf.config.vision_feature_select_strategy == "full"
        return n + int(full and v.model_type == "clip_vision_model")  # "default" drops CLIP's CLS token


class InternVLMLLM(HFMLLM):
    """``InternVLForConditionalGeneration``: InternViT, pixel shuffle (``downsample_ratio``), MLP projector, Qwen2.

    Args:
        image_wrap: the token ids before and after each image's placeholders (``<img>``, ``</img>``).
    """

    def __init__(self, model: nn.Module, *, image_size: int, image_mean, image_std,
                 image_wrap: tuple[list[int], list[int]]) -> None:
        super().__init__(model, image_size=image_size, image_mean=image_mean, image_std=image_std)
        self.image_wrap = image_wrap

    @property
    def num_image_tokens(self) -> int:
        v, ratio = self.hf.config.vision_config, self.hf.config.downsample_ratio
        side, patch = _first(v.image_size), _first(v.patch_size)
        return int((side // patch) ** 2 * ratio ** 2)  # CLS dropped, then pixel-shuffled

    def data_spec(self) -> dict:
        return {**super().data_spec(), "image_wrap": self.image_wrap}

    def _image_features(self, pixel_values, **model_inputs):
        cfg = self.hf.config  # the inner model's get_image_features takes no defaults from its config
        return self.hf.model.get_image_features(pixel_values=pixel_values,
                                                vision_feature_layer=cfg.vision_feature_layer,
                                                vision_feature_select_strategy=cfg.vision_feature_select_strategy)


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class Qwen2VLMLLM(HFMLLM):
    """``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` /
    ``Qwen3VLForConditionalGeneration`` (16 px patches; its deepstack features reach the first
    decoder layers inside transformers' own forward, its interleaved M-RoPE from the same
    ``get_rope_index``).

    Position ids are Qwen2-VL's 3-D M-RoPE ones: at the prefill (and in training)
    they come from the model's ``get_rope_index`` over the image grids; while
    decoding, the caller's 1-D position plus the per-sample offset the prefill
    left (``rope_deltas``), as transformers' own ``generate`` does.
    """

    def __init__(self, model: nn.Module, *, image_size: int, image_mean, image_std) -> None:
        super().__init__(model, image_size=image_size, image_mean=image_mean, image_std=image_std)
        v = model.config.vision_config
        self.inputs = Qwen2VLInputs(self.image_token_id, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                    temporal_patch_size=v.temporal_patch_size)
        side = v.patch_size * v.spatial_merge_size
        if image_size % side:
            raise ValueError(f"{model.config.model_type}: image_size {image_size} must be a multiple of {side} "
                             "(patch x merge)")
        self._rope_deltas: torch.Tensor | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.inputs.tokens_per_image(self.image_size)

    def data_spec(self) -> dict:
        cfg = self.hf.config
        return {**super().data_spec(), "image_wrap": ([cfg.vision_start_token_id], [cfg.vision_end_token_id]),
                "model_inputs": self.inputs}

    def _vision_dtype(self) -> torch.dtype:
        return self.hf.model.visual.dtype

    def _image_features(self, pixel_values, *, image_grid_thw=None, **model_inputs):
        return self.hf.model.get_image_features(pixel_values, image_grid_thw)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, *, position_ids=None,
                image_grid_thw=None, mm_token_type_ids=None, **kwargs):
        cache = take_cache(kwargs)
        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if past == 0:
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == self.image_token_id).int()
            position_ids, deltas = self.hf.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
                                                                attention_mask=attention_mask)
            self._rope_deltas = deltas  # (B, 1)
        else:
            if position_ids is None or self._rope_deltas is None:
                raise ValueError("decoding with a KV cache needs 1-D position_ids and a prefill through this model")
            position_ids = (position_ids + self._rope_deltas.to(position_ids.device)).unsqueeze(0).expand(3, -1, -1)
        return super().forward(input_ids, attention_mask, pixel_values, labels, position_ids=position_ids,
                               cache=cache, image_grid_thw=image_grid_thw,
                               mm_token_type_ids=mm_token_type_ids, **kwargs)


def _processor_geometry(path: Path, family: str, model: nn.Module, image_size: int | None):
    """(image side, mean, std) from the directory's image processor."""
    from transformers import AutoImageProcessor  # heavy: transformers' auto classes load their code on first use

    if not (path / "preprocessor_config.json").exists():
        raise FileNotFoundError(f"{path / 'preprocessor_config.json'} is missing: the image processor's "
                                "normalization is needed (save it with processor.save_pretrained(path))")
    proc = AutoImageProcessor.from_pretrained(path)
    mean, std = proc.image_mean, proc.image_std
    if family in ("llava", "internvl"):
        side = _first(model.config.vision_config.image_size)  # the tower's position embeddings fix it
        if image_size not in (None, side):
            raise ValueError(f"{path}: {family}'s vision tower takes {side} px images; image_size {image_size} "
                             "cannot apply")
        return side, mean, std
    v = model.config.vision_config
    step = v.patch_size * v.spatial_merge_size
    if image_size is None:
        longest = (proc.size.get("longest_edge") if hasattr(proc.size, "get") else None) or QWEN_DEFAULT_SIDE ** 2
        image_size = max(step, min(QWEN_DEFAULT_SIDE, int(math.sqrt(longest)) // step * step))
    return image_size, mean, std


def load_hf_mllm(path: str | Path, *, dtype: torch.dtype | None = None, image_size: int | None = None,
                 attn_implementation: str | None = None, device: torch.device | str | None = None):
    """(HFMLLM, tokenizer) from a local transformers checkpoint directory; ``device``: where the
    weights are read to, straight from the files (``device_map``; ``None``: the CPU). On the ``meta``
    device nothing but ``config.json`` is needed: the model is built from it without weights (what
    ``mllm-cl plan`` counts), the tokenizer and image processor read only if the folder has them."""
    from transformers import AutoConfig, AutoTokenizer  # heavy: transformers' auto classes load their code on first use

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    family = config.model_type
    if family not in FAMILIES:
        raise ValueError(f"{path / 'config.json'}: model_type {family!r} is not supported; "
                         f"supported: {', '.join(FAMILIES)} (or a ComposedMLLM directory with mllm_cl.json)")
    if device is not None and torch.device(device).type == "meta":
        return _skeleton(path, config, family, dtype=dtype, image_size=image_size)
    model = getattr(transformers, FAMILIES[family]).from_pretrained(path, dtype=dtype,
                                                                    **load_options(attn_implementation, device))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        log.info("%s: the tokenizer has no pad token; padding with its EOS token", path)
        tokenizer.pad_token = tokenizer.eos_token
    side, mean, std = _processor_geometry(path, family, model, image_size)
    if family == "internvl":
        wrap = [getattr(tokenizer, "start_image_token", None) or "<img>", getattr(tokenizer, "end_image_token", None)
                or "</img>"]
        ids = tokenizer.convert_tokens_to_ids(wrap)
        if tokenizer.unk_token_id in ids or None in ids:
            raise ValueError(f"{path}: the tokenizer has no {wrap[0]} / {wrap[1]} tokens that InternVL wraps images in")
        return InternVLMLLM(model, image_size=side, image_mean=mean, image_std=std,
                            image_wrap=([ids[0]], [ids[1]])), tokenizer
    wrapper = LlavaMLLM if family == "llava" else Qwen2VLMLLM
    return wrapper(model, image_size=side, image_mean=mean, image_std=std), tokenizer


#: CLIP's normalization, for a skeleton whose folder has no image processor file.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _skeleton(path: Path, config, family: str, *, dtype: torch.dtype | None, image_size: int | None):
    """(HFMLLM on the meta device, tokenizer or None) from ``config.json`` alone."""
    from transformers import AutoTokenizer  # heavy: transformers' auto classes load their code on first use

    with torch.device("meta"):
        model = getattr(transformers, FAMILIES[family])._from_config(config, dtype=dtype)
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    if (path / "preprocessor_config.json").exists():
        side, mean, std = _processor_geometry(path, family, model, image_size)
    elif family in ("llava", "internvl"):
        side, mean, std = _first(model.config.vision_config.image_size), CLIP_MEAN, CLIP_STD
    else:
        v = model.config.vision_config
        step = v.patch_size * v.spatial_merge_size
        side, mean, std = image_size or QWEN_DEFAULT_SIDE // step * step, CLIP_MEAN, CLIP_STD
    if family == "internvl":
        return InternVLMLLM(model, image_size=side, image_mean=mean, image_std=std, image_wrap=([0], [0])), tokenizer
    wrapper = LlavaMLLM if family == "llava" else Qwen2VLMLLM
    return wrapper(model, image_size=side, image_mean=mean, image_std=std), tokenizer
