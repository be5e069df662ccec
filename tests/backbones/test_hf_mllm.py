"""Transformers MLLMs from a local directory: tiny Llava / Qwen2-VL / Qwen2.5-VL checkpoints saved to
disk and loaded back through the path a user's checkpoint takes."""

import json

import numpy as np
import pytest
import torch

from mllm_cl.backbones import HFMLLM, build_backbone, load_backbone
from mllm_cl.backbones.hf_mllm import FAMILIES as HF_FAMILIES
from mllm_cl.backbones.hf_tiny import BUILDERS
from mllm_cl.backbones.hf_tiny import main as tiny_main
from mllm_cl.data.encoding import ConversationEncoder
from mllm_cl.data.model_inputs import Qwen2VLInputs
from mllm_cl.eval.generation import greedy_generate
from mllm_cl.experts import ExpertSetup, expert_layers

FAMILIES = [f for f in BUILDERS if f in HF_FAMILIES]  # BUILDERS also writes a CLIP model (a routing encoder)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


def _batch(model, tok, *, text_only_row=True):
    """Left-padded prompts (one image each, plus a text-only one) with the model's own inputs."""
    spec = model.data_spec()
    opening, closing = spec.get("image_wrap", ([], []))
    image = opening + [spec["image_token_id"]] * spec["num_image_tokens"] + closing
    rows = [[tok.bos_token_id] + image + [50, 51, 52], [tok.bos_token_id] + image + [60, 61, 62, 63, 64, 65]]
    if text_only_row:
        rows.append([tok.bos_token_id, 70, 71])
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.randn(2, 3, model.image_size, model.image_size)}
    if "model_inputs" in spec:
        batch = spec["model_inputs"](batch)
    return batch


def test_loads_through_the_user_path(checkpoint):
    family, path = checkpoint
    backbone = build_backbone(path=str(path))
    model = backbone.model
    assert isinstance(model, HFMLLM) and model.family == family
    config = json.loads((path / "config.json").read_text())
    assert model.image_token_id == config.get("image_token_id", config.get("image_token_index"))
    assert model.num_image_tokens == (16 if family == "llava" else 4)  # 32 px / 8 px patches; 56 px / 14 px / 2x2
    assert not any(p.requires_grad for p in model.parameters())


def test_experts_go_into_the_language_model_only(checkpoint):
    family, path = checkpoint
    backbone = load_backbone(path)
    model, tok = backbone.model, backbone.tokenizer
    report = ExpertSetup(target_modules=["q_proj", "v_proj", "qkv", "up_proj"], rank=4).apply(model)
    names = list(expert_layers(model))
    assert names and all(".language_model." in n for n in names), names
    assert report.scope == "hf.model.language_model"
    for layer in expert_layers(model).values():
        layer.add_expert("e0")
    batch = _batch(model, tok)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                labels=labels, **batch.get("model_inputs", {}))
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".experts.e0." in n for n in trained)


def test_cached_greedy_decoding_matches_a_full_forward(checkpoint):
    """Prefill + one token at a time with the KV cache (and, for Qwen2-VL, M-RoPE offsets) gives the
    tokens a full forward over prompt + answer predicts, for left-padded and text-only rows."""
    family, path = checkpoint
    backbone = load_backbone(path)
    model, tok = backbone.model, backbone.tokenizer
    batch = _batch(model, tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    extra = batch.get("model_inputs", {})
    new = greedy_generate(model, ids, mask, batch["pixel_values"], max_new_tokens=6, eos_token_id=-1,
                          pad_token_id=tok.pad_token_id, model_inputs=extra)
    full = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    if "mm_token_type_ids" in extra:
        extra = {**extra, "mm_token_type_ids": (full == model.image_token_id).int()}
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(full, attention_mask=full_mask, pixel_values=batch["pixel_values"], position_ids=positions,
                   **extra).logits
    assert torch.equal(logits[:, ids.shape[1] - 1:-1].argmax(-1), new)


def test_decoding_emits_no_deprecation(checkpoint, no_future_warnings):
    """Prefill and cached decoding hand the KV cache on under the name the installed transformers takes."""
    family, path = checkpoint
    backbone = load_backbone(path)
    model, tok = backbone.model, backbone.tokenizer
    batch = _batch(model, tok)
    new = greedy_generate(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=3,
                          eos_token_id=-1, pad_token_id=tok.pad_token_id, model_inputs=batch.get("model_inputs"))
    assert new.shape == (3, 3)


def test_qwen_patches_equal_the_qwen2_vl_image_processor(tmp_path):
    from transformers import Qwen2VLImageProcessor

    proc = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8) for _ in range(2)]
    ref = proc(images=images, do_resize=False, return_tensors="pt")
    mean = torch.tensor(proc.image_mean).view(3, 1, 1)
    std = torch.tensor(proc.image_std).view(3, 1, 1)
    pixels = torch.stack([(torch.from_numpy(im).permute(2, 0, 1).float() / 255 - mean) / std for im in images])
    patches, grid = Qwen2VLInputs(image_token_id=0).patchify(pixels)
    assert torch.equal(grid, ref["image_grid_thw"])
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=1e-5)


def test_qwen_inputs_come_from_collation():
    inputs = Qwen2VLInputs(image_token_id=7)
    batch = {"input_ids": torch.tensor([[1, 7, 7, 7, 7, 2], [0, 0, 0, 0, 1, 2]]),
             "pixel_values": torch.zeros(1, 3, 56, 56)}
    out = inputs(batch)
    assert out["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    assert out["model_inputs"]["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert out["model_inputs"]["mm_token_type_ids"].tolist() == [[0, 1, 1, 1, 1, 0], [0] * 6]
    with pytest.raises(ValueError, match="multiples of patch_size x merge_size = 28"):
        inputs({"input_ids": batch["input_ids"], "pixel_values": torch.zeros(1, 3, 42, 42)})


def test_encoder_wraps_each_image_in_the_models_tokens(tmp_path):
    backbone = load_backbone(BUILDERS["qwen2_vl"](tmp_path / "q"))
    model, tok = backbone.model, backbone.tokenizer
    spec = model.data_spec()
    enc = ConversationEncoder(tok, num_image_tokens=spec["num_image_tokens"], template="short",
                              image_token_id=spec["image_token_id"], image_wrap=spec["image_wrap"])
    ids = enc.encode_prompt("<image>\nWhat is it?")
    start, end = spec["image_wrap"][0][0], spec["image_wrap"][1][0]
    i = ids.index(start)
    assert ids[i + 1: i + 5] == [model.image_token_id] * 4 and ids[i + 5] == end


def test_qwen_image_size_is_checked_and_llava_refuses_one(tmp_path):
    qwen = BUILDERS["qwen2_vl"](tmp_path / "q")
    assert load_backbone(qwen, image_size=84).model.num_image_tokens == 9
    with pytest.raises(ValueError, match="multiple of 28"):
        load_backbone(qwen, image_size=60)
    llava = BUILDERS["llava"](tmp_path / "l")
    with pytest.raises(ValueError, match="takes 32 px images"):
        load_backbone(llava, image_size=64)


def test_bad_directories_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither mllm_cl.json"):
        load_backbone(tmp_path)
    path = BUILDERS["llava"](tmp_path / "l")
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        load_backbone(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'llama' is not supported"):
        load_backbone(path)


def test_tiny_checkpoint_command(tmp_path, capsys):
    assert tiny_main(["llava", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "config.json").exists() and (tmp_path / "t" / "preprocessor_config.json").exists()


def test_image_embeddings_pool_the_projected_features(checkpoint):
    family, path = checkpoint
    model = load_backbone(path).model
    batch = _batch(model, load_backbone(path).tokenizer)
    extra = {k: v for k, v in batch.get("model_inputs", {}).items() if k == "image_grid_thw"}
    emb = model.image_embeddings(batch["pixel_values"], **extra)
    assert emb.shape == (2, model.config.get_text_config().hidden_size)
    assert model.get_input_embeddings().weight.shape[1] == emb.shape[1]


def _labelled(batch):
    """The batch with labels: the last three real tokens of each row supervised."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -3:] = batch["input_ids"][:, -3:]
    return {**batch, "labels": labels}


def test_supervised_positions_loss_equals_the_full_logits_loss(checkpoint):
    from mllm_cl.data.collate import supervised_positions
    from mllm_cl.system.lm_loss import final_norm_deferred, supervised_lm_loss

    family, path = checkpoint
    backbone = load_backbone(path)
    model, tok = backbone.model, backbone.tokenizer
    batch = _labelled(_batch(model, tok))
    inputs = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                  **batch.get("model_inputs", {}))
    full = model(batch["input_ids"], labels=batch["labels"], **inputs).loss
    hidden = model(batch["input_ids"], hidden_only=True, **inputs).last_hidden_state
    ours = supervised_lm_loss(hidden, batch["labels"], model.output_head, supervised_positions(batch["labels"]))
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-6)
    with final_norm_deferred(model.text_decoder) as norm:  # the final norm at the supervised rows only
        raw = model(batch["input_ids"], hidden_only=True, **inputs).last_hidden_state
    deferred = supervised_lm_loss(raw, batch["labels"], lambda h: model.output_head(norm(h)))
    torch.testing.assert_close(deferred, full, rtol=1e-6, atol=1e-6)


def test_checkpointed_layers_give_the_same_gradients(checkpoint):
    family, path = checkpoint
    backbone = load_backbone(path)
    model, tok = backbone.model, backbone.tokenizer
    ExpertSetup(target_modules=["q_proj", "v_proj", "up_proj"], rank=4).apply(model)
    for layer in expert_layers(model).values():
        expert = layer.add_expert("e0")
        torch.nn.init.normal_(expert.B)
    model.train()
    batch = _labelled(_batch(model, tok))
    inputs = dict(attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                  **batch.get("model_inputs", {}))
    grads = []
    for enabled in (False, True):
        model.set_checkpointing(enabled)
        model.zero_grad()
        model(batch["input_ids"], labels=batch["labels"], **inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)
