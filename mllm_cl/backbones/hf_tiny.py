"""Tiny random transformers MLLMs saved like a hub checkpoint: model, tokenizer, image processor.

They exercise the exact loading path a user's LLaVA-1.5, Qwen2-VL, Qwen3-VL or InternVL directory
takes (``load_hf_mllm``), offline, in a second: tests use them, and
``mllm-cl`` users can try a config against one before pointing it at 7B weights::

    python -m mllm_cl.backbones.hf_tiny qwen2_vl /tmp/tiny-qwen2-vl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from tokenizers import processors

from mllm_cl.backbones.tokenizer import byte_tokenizer

#: Qwen2-VL's tokens around each image's placeholders.
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
#: InternVL's tokens around each image's placeholders.
IMG_START, IMG_END = "<img>", "</img>"


def _text_config(tok, width: int, layers: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                initializer_range=0.1, tie_word_embeddings=True)


def tiny_llava(directory: str | Path, *, seed: int = 0, width: int = 64, layers: int = 2, image_size: int = 32):
    """A LLaVA-1.5-shaped model (CLIP tower, penultimate layer, CLS dropped, MLP projector, Llama)."""
    # heavy: this family's code only
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tok = byte_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=8)
    text = LlamaConfig(**_text_config(tok, width, layers))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                         image_seq_length=(image_size // 8) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return _save(directory, model, tok, processor)


def tiny_qwen2_vl(directory: str | Path, *, seed: int = 0, width: int = 64, layers: int = 2, image_size: int = 56,
                  v2_5: bool = False):
    """A Qwen2-VL (or Qwen2.5-VL) model: 14 px patches merged 2 x 2, M-RoPE text model."""
    from transformers import Qwen2VLImageProcessor  # heavy: this family's code only

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [VISION_START, VISION_END]})
    text = _text_config(tok, width, layers)
    half = width // text["num_attention_heads"] // 2  # M-RoPE sections (t, h, w) must sum to head_dim / 2
    hw = half * 3 // 8
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [half - 2 * hw, hw, hw]}
    if v2_5:
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=width,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=28,
                      fullatt_block_indexes=[1])
        name = "Qwen2_5_VL"
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=width, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        name = "Qwen2VL"
    ids = tok.convert_tokens_to_ids([VISION_START, VISION_END])
    config = getattr(transformers, f"{name}Config")(
        vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
        vision_start_token_id=ids[0], vision_end_token_id=ids[1], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    pixels = image_size * image_size
    processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14,
                                      merge_size=2, temporal_patch_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, f"{name}ForConditionalGeneration")(config)
    return _save(directory, model, tok, processor)


def tiny_qwen3_vl(directory: str | Path, *, seed: int = 0, width: int = 64, layers: int = 2, image_size: int = 64):
    """A Qwen3-VL model: 16 px patches merged 2 x 2, deepstack features from vision layer 0, interleaved M-RoPE
    Qwen3 text model; one 64 px image is 4 image tokens."""
    # heavy: this family's code only
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [VISION_START, VISION_END]})
    text = _text_config(tok, width, layers)
    head = width // text["num_attention_heads"]
    text.update(head_dim=head, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [head // 2 - 2 * (head // 8), head // 8, head // 8],
                                                "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=width, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    ids = tok.convert_tokens_to_ids([VISION_START, VISION_END])
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                           vision_start_token_id=ids[0], vision_end_token_id=ids[1], tie_word_embeddings=True)
    pixels = image_size * image_size
    processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=16,
                                      merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    return _save(directory, model, tok, processor)


def tiny_internvl(directory: str | Path, *, seed: int = 0, width: int = 64, layers: int = 2, image_size: int = 32):
    """An InternVL-shaped model (InternViT with a CLS token, 8 px patches, pixel shuffle 0.5, MLP projector, Qwen2),
    its images wrapped in ``<img>`` / ``</img>``; one 32 px tile is 4 image tokens."""
    # heavy: this family's code only
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMG_START, IMG_END]})
    text = {**_text_config(tok, width, layers), "model_type": "qwen2"}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[image_size, image_size], patch_size=[8, 8])
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                            image_seq_length=(image_size // 8) ** 2 // 4, downsample_ratio=0.5,
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    processor = GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}, crop_to_patches=False,
                                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return _save(directory, model, tok, processor)


def tiny_clip(directory: str | Path, *, seed: int = 0, width: int = 32, projection: int = 16, image_size: int = 32):
    """A CLIPModel (both towers and projections) with a CLIP-like tokenizer: ``<|startoftext|> ... <|endoftext|>``,
    the end token the highest id (CLIP's text tower pools there), right padding. A routing encoder for tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # heavy: this family's code only

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|startoftext|>", "<|endoftext|>"]})
    sot, eot = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", sot), ("<|endoftext|>", eot)])
    tok.padding_side = "right"
    layers = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=sot,
                                         eos_token_id=eot, pad_token_id=tok.pad_token_id, **layers),
                        vision_config=dict(image_size=image_size, patch_size=8, **layers), projection_dim=projection)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return _save(directory, model, tok, processor)


def _save(directory, model, tokenizer, processor) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


BUILDERS = {"llava": tiny_llava, "clip": tiny_clip, "qwen2_vl": tiny_qwen2_vl,
            "qwen2_5_vl": lambda d, **kw: tiny_qwen2_vl(d, v2_5=True, **kw), "internvl": tiny_internvl,
            "qwen3_vl": tiny_qwen3_vl}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mllm_cl.backbones.hf_tiny",
                                description="Write a tiny random transformers MLLM checkpoint directory "
                                            "(or a tiny CLIP, for the clip routing encoder).")
    p.add_argument("family", choices=sorted(BUILDERS), help="which model class to build")
    p.add_argument("out", help="directory to write (model, tokenizer and image processor)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    print(BUILDERS[args.family](args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
