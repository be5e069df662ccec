"""Tiny backbones: build offline fast, run forward/backward, save and load through from_pretrained."""

import time

import pytest
import torch

from mllm_cl.backbones import PRESETS, build_backbone, build_preset, byte_tokenizer, load_backbone, train_bpe_tokenizer


def _inputs(model, tok, with_text_only=True):
    n = model.num_image_tokens
    img = [tok.bos_token_id] + [tok.image_token_id] * n + tok(" what shape?").input_ids
    text = [tok.bos_token_id] + tok(" hello there, what is up?").input_ids
    rows = [img, text] if with_text_only else [img]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left padding
    mask = (ids != tok.pad_token_id).long()
    pixels = torch.randn(1, 3, model.image_size, model.image_size)
    return ids, mask, pixels


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_fast_and_trains(name):
    build_preset(name)  # first call pays the imports
    t0 = time.perf_counter()
    backbone = build_preset(name, seed=3)
    assert time.perf_counter() - t0 < 1.0
    model, tok = backbone.model, backbone.tokenizer
    assert model.num_image_tokens == 16  # 32x32 images, 8x8 patches
    ids, mask, pixels = _inputs(model, tok)
    out = model(ids, attention_mask=mask, pixel_values=pixels, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.shape == (*ids.shape, len(tok))
    out.loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())  # frozen tower
    assert model.language_model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_same_seed_same_weights_and_no_global_rng_change():
    state = torch.random.get_rng_state()
    a, b = build_preset("tiny-clip-llama", seed=1).model, build_preset("tiny-clip-llama", seed=1).model
    assert torch.equal(torch.random.get_rng_state(), state)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert torch.equal(p, q), n
    c = build_preset("tiny-clip-llama", seed=2).model
    assert not torch.equal(a.projector[0].weight, c.projector[0].weight)


def test_image_features_replace_placeholders_and_counts_are_checked():
    backbone = build_preset("tiny-clip-llama")
    model, tok = backbone.model, backbone.tokenizer
    ids, _, pixels = _inputs(model, tok, with_text_only=False)
    emb = model.embed(ids, pixels)
    positions = (ids[0] == tok.image_token_id).nonzero().flatten()
    torch.testing.assert_close(emb[0, positions], model.encode_images(pixels)[0])
    with pytest.raises(ValueError, match="16 image tokens .* but 2 images"):
        model(ids, pixel_values=torch.cat([pixels, pixels]))


@pytest.mark.parametrize("name", list(PRESETS))
def test_save_and_load_from_local_directory(tmp_path, name):
    backbone = build_preset(name, seed=5)
    backbone.model.save_pretrained(tmp_path, backbone.tokenizer)
    loaded = build_backbone(path=str(tmp_path))
    ids, mask, pixels = _inputs(backbone.model, backbone.tokenizer)
    backbone.model.eval(), loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(ids, attention_mask=mask, pixel_values=pixels).logits,
            backbone.model(ids, attention_mask=mask, pixel_values=pixels).logits,
        )
    assert loaded.tokenizer(" abc").input_ids == backbone.tokenizer(" abc").input_ids
    assert loaded.tokenizer.padding_side == "left"


def test_loading_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds neither mllm_cl.json .* nor config.json"):
        load_backbone(tmp_path)
    (tmp_path / "mllm_cl.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed JSON at line 1"):
        load_backbone(tmp_path)
    with pytest.raises(ValueError, match="unknown backbone preset 'huge'"):
        build_preset("huge")


def test_tokenizers_are_offline_and_round_trip():
    tok = byte_tokenizer()
    text = "<image>\nWhat colour is the square? Ünïcode ok."
    ids = tok(text).input_ids
    assert ids[0] == tok.image_token_id and tok.decode(ids) == text
    bpe = train_bpe_tokenizer(["the red square is left of the blue circle"] * 20, vocab_size=300)
    assert len(bpe(" the red square").input_ids) < len(tok(" the red square").input_ids)
    assert bpe.decode(bpe(" the red square").input_ids) == " the red square"


def test_generation_returns_new_tokens_only():
    backbone = build_preset("tiny-clip-llama")
    model, tok = backbone.model, backbone.tokenizer
    ids, mask, pixels = _inputs(model, tok, with_text_only=False)
    out = model.generate(ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, min_new_tokens=3,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 3)


def test_saving_a_model_with_experts_is_refused(tmp_path):
    from mllm_cl.experts import ExpertSetup

    backbone = build_preset("tiny-clip-llama")
    ExpertSetup(["q_proj"], initial_experts=["e0"]).apply(backbone.model)
    with pytest.raises(RuntimeError, match="expert layers injected"):
        backbone.model.save_pretrained(tmp_path)


def test_generate_refuses_whole_prompt_routers():
    from mllm_cl.experts import ExpertSetup, SequenceTopKRouter

    backbone = build_preset("tiny-clip-llama")
    ExpertSetup(["q_proj"], router=SequenceTopKRouter, initial_experts=["a", "b"]).apply(backbone.model)
    with pytest.raises(RuntimeError, match="greedy_generate"):
        backbone.model.generate(torch.tensor([[1, 30, 31]]), max_new_tokens=2)


@pytest.mark.parametrize("preset", ["tiny-base", "tiny-base-coin"])
def test_packaged_bases_build_on_the_meta_device(preset):
    """``mllm-cl plan`` builds the model on ``meta``: a packaged base loads there without a kernel from the hub
    (transformers 5 kernelizes by default when the ``kernels`` package is installed, which fails on ``meta``)."""
    built = build_backbone(preset, device="meta")
    assert all(p.device.type == "meta" for p in built.model.parameters())
