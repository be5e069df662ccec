"""Qwen3-VL from a local directory: the patches our collation makes equal its processor's, and our forward
(M-RoPE positions from the prompt, deepstack inside transformers) equals the model's own on the processor's inputs."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from mllm_cl.backbones import load_backbone
from mllm_cl.backbones.hf_tiny import tiny_qwen3_vl
from mllm_cl.data.images import ImageProcessor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))


def test_collated_patches_equal_the_qwen3_vl_processor_and_the_forward_its_own(checkpoint):
    backbone = load_backbone(checkpoint)
    model, tok = backbone.model, backbone.tokenizer
    spec = model.data_spec()
    proc = AutoImageProcessor.from_pretrained(checkpoint)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ref = proc(images=[image], return_tensors="pt")
    assert ImageProcessor.for_model(model).mean.flatten().tolist() == [0.5] * 3
    (start,), (end,) = spec["image_wrap"]
    ids = torch.tensor([[tok.pad_token_id, tok.bos_token_id, start] + [model.image_token_id] * 4 + [end, 50, 51, 52]])
    mask = (ids != tok.pad_token_id).long()
    batch = spec["model_inputs"]({"input_ids": ids, "attention_mask": mask,
                                  "pixel_values": ImageProcessor.for_model(model)(image)[None]})
    inputs = batch["model_inputs"]
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(inputs["image_grid_thw"], ref["image_grid_thw"])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **inputs).logits
        theirs = model.hf(input_ids=ids, attention_mask=mask, pixel_values=ref["pixel_values"],
                          image_grid_thw=ref["image_grid_thw"],
                          mm_token_type_ids=(ids == model.image_token_id).int()).logits
    real = mask.bool()[0]
    torch.testing.assert_close(ours[0, real], theirs[0, real], atol=1e-5, rtol=1e-5)
    # the image matters (deepstack and the merged features reach the text)
    with torch.no_grad():
        blank = model(ids, attention_mask=mask, pixel_values=torch.zeros_like(batch["pixel_values"]),
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **inputs).logits
    assert float((blank[0, real] - ours[0, real]).abs().max()) > 1e-4
