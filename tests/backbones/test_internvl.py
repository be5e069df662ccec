"""InternVL from a local directory: our image preprocessing equals its processor's, and the encoder wraps each
image's placeholders in the tokenizer's ``<img>`` / ``</img>`` as InternVL's processor does."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from mllm_cl.backbones import load_backbone
from mllm_cl.backbones.hf_tiny import IMG_END, IMG_START, tiny_internvl
from mllm_cl.data.encoding import ConversationEncoder
from mllm_cl.data.images import ImageProcessor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_internvl(tmp_path_factory.mktemp("internvl"))


def test_pixels_equal_the_internvl_image_processor(checkpoint):
    model = load_backbone(checkpoint).model
    ours = ImageProcessor.for_model(model)
    proc = AutoImageProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    # the tower's size; twice it (both bicubic resizes agree); 1.5x (PIL's and torchvision's bicubic differ a little)
    for side, tol in ((32, 1e-5), (64, 1e-5), (48, 0.03)):
        image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        ref = proc(images=[image], return_tensors="pt")["pixel_values"]
        assert ref.shape == (1, 3, 32, 32)
        torch.testing.assert_close(ours(image)[None], ref, atol=tol, rtol=0)


def test_encoder_wraps_each_image_in_img_tokens(checkpoint):
    backbone = load_backbone(checkpoint)
    model, tok = backbone.model, backbone.tokenizer
    spec = model.data_spec()
    assert spec["image_wrap"] == ([tok.convert_tokens_to_ids(IMG_START)], [tok.convert_tokens_to_ids(IMG_END)])
    enc = ConversationEncoder(tok, num_image_tokens=spec["num_image_tokens"], template="short",
                              image_token_id=spec["image_token_id"], image_wrap=spec["image_wrap"])
    ids = enc.encode_prompt("<image>\nWhat is it?")
    i = ids.index(spec["image_wrap"][0][0])
    assert ids[i + 1: i + 5] == [model.image_token_id] * 4 and ids[i + 5] == spec["image_wrap"][1][0]
    assert model.hf.config.image_seq_length == spec["num_image_tokens"] == 4
