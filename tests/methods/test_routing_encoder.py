"""RoutingEncoder: the backbone's own frozen features and a CLIPModel from a local directory."""

import os

import pytest
import torch

from mllm_cl.backbones import build_preset
from mllm_cl.backbones.hf_tiny import tiny_clip, tiny_qwen2_vl
from mllm_cl.data.model_inputs import Qwen2VLInputs
from mllm_cl.methods.routing_encoder import RoutingEncoder


@pytest.fixture(scope="module")
def backbone():
    return build_preset("tiny-clip-llama", seed=0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


def _batch(backbone, instructions, has_image):
    n_img = sum(has_image)
    size = backbone.model.image_size
    return {"input_ids": torch.zeros(len(instructions), 4, dtype=torch.long), "instruction": instructions,
            "has_image": torch.tensor(has_image),
            "pixel_values": (torch.randn(n_img, 3, size, size, generator=torch.Generator().manual_seed(0))
                             if n_img else None)}


def test_backbone_features_are_the_instruction_tokens_mean_embedding(backbone):
    enc = RoutingEncoder().bind(backbone.model, backbone.tokenizer)
    feats = enc(_batch(backbone, ["What colour is it?", "How many circles?"], [True, False]))
    ids = backbone.tokenizer("What colour is it?", add_special_tokens=False)["input_ids"]
    expected = backbone.model.get_input_embeddings()(torch.tensor(ids)).mean(0)
    torch.testing.assert_close(feats.text[0], expected)
    assert feats.image.shape == (2, enc.image_dim) and bool(feats.image[1].eq(0).all())
    pixels = _batch(backbone, ["a"], [True])["pixel_values"]
    torch.testing.assert_close(feats.image[0], backbone.model.image_embeddings(pixels)[0])
    assert not any(p.requires_grad for p in [feats.image, feats.text])


def test_clip_encoder_loads_offline_from_disk(backbone, clip_dir):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    enc = RoutingEncoder("clip", path=str(clip_dir)).bind(backbone.model, backbone.tokenizer)
    feats = enc(_batch(backbone, ["What colour is it?", "How many circles?"], [True, True]))
    assert feats.image.shape == feats.text.shape == (2, 16) and enc.image_dim == 16
    assert not torch.allclose(feats.text[0], feats.text[1]) and not torch.allclose(feats.image[0], feats.image[1])
    # The same text gives the same feature whatever it is batched with (right padding, EOS pooling).
    alone = enc(_batch(backbone, ["How many circles?"], [False]))
    torch.testing.assert_close(alone.text[0], feats.text[1], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in enc.clip.parameters())
    assert not any(p is q for p in enc.clip.parameters() for q in backbone.model.parameters())


def test_clip_errors_name_the_folder_and_the_files(tmp_path, backbone):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        RoutingEncoder("clip", path=str(tmp_path / "nope")).bind(backbone.model, backbone.tokenizer)
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(FileNotFoundError, match=r"missing: preprocessor_config.json .*the weights.*the tokenizer"):
        RoutingEncoder("clip", path=str(tmp_path)).bind(backbone.model, backbone.tokenizer)
    with pytest.raises(ValueError, match="needs routing_encoder.path"):
        RoutingEncoder("clip")
    with pytest.raises(ValueError, match="must be one of backbone, clip"):
        RoutingEncoder("siglip")


def test_qwen2_vl_patches_go_back_to_images(tmp_path):
    spec = Qwen2VLInputs(image_token_id=5)
    pixels = torch.randn(3, 3, 56, 56)
    patches, grid = spec.patchify(pixels)
    torch.testing.assert_close(spec.unpatchify(patches, grid), pixels)


def test_clip_encoder_reads_qwen2_vl_batches(tmp_path, clip_dir):
    from mllm_cl.backbones.hf_mllm import load_hf_mllm

    model, tokenizer = load_hf_mllm(tiny_qwen2_vl(tmp_path / "qwen"))
    spec = model.data_spec()["model_inputs"]
    images = torch.rand(2, 3, 56, 56)
    mean, std = torch.tensor(model.image_mean).view(1, 3, 1, 1), torch.tensor(model.image_std).view(1, 3, 1, 1)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "instruction": ["a", "b"],
             "has_image": torch.tensor([True, True]), "pixel_values": (images - mean) / std}
    batch = spec(batch)  # patches and grids, as the collator makes them
    enc = RoutingEncoder("clip", path=str(clip_dir)).bind(model, tokenizer)
    torch.testing.assert_close(enc.backbone_images(batch), images, atol=1e-5, rtol=1e-5)
    assert enc(batch).image.shape == (2, 16)
