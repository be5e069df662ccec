"""ContinualMLLM: only trainable parameters reach the optimizer; options are checked."""

import pytest
import torch

from mllm_cl.experts import ExpertSetup, routing_context
from mllm_cl.methods import Individual
from mllm_cl.system.module import ContinualMLLM


def test_frozen_experts_are_not_in_the_optimizer():
    module = ContinualMLLM(Individual(ExpertSetup(["q_proj", "v_proj"], rank=4)))
    method = module.method
    method.on_task_start(module.model, 0)
    method.on_task_start(module.model, 1)
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    assert in_optimizer and all(".experts.task1." in names[i] for i in in_optimizer)
    old = [p for n, p in module.named_parameters() if ".experts.task0." in n]
    assert old and not any(id(p) in in_optimizer for p in old)


def test_max_phase_steps_must_be_positive():
    with pytest.raises(ValueError, match="model.max_phase_steps must be >= 1"):
        ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), max_phase_steps=0)


def test_bf16_base_with_fp32_experts():
    module = ContinualMLLM(Individual(ExpertSetup(["q_proj", "v_proj"], rank=4)), backbone_dtype="bfloat16")
    module.method.on_task_start(module.model, 0)
    experts = [p for n, p in module.named_parameters() if ".experts." in n]
    base = [p for n, p in module.named_parameters() if ".experts." not in n]
    assert experts and all(p.dtype == torch.float32 for p in experts)
    assert all(p.dtype == torch.bfloat16 for p in base)
    assert module.backbone_info["dtype"] == "bfloat16" and module.backbone_info["expert_dtype"] == "float32"


def test_expert_dtype_null_follows_the_base():
    module = ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), backbone_dtype="bf16", expert_dtype=None)
    module.method.on_task_start(module.model, 0)
    assert all(p.dtype == torch.bfloat16 for n, p in module.named_parameters() if ".experts." in n)


def test_unknown_dtype_names_the_key():
    with pytest.raises(ValueError, match="model.backbone_dtype: unknown dtype 'half'"):
        ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), backbone_dtype="half")


def _micro_batch(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (3, 30), generator=g)
    ids[:, 1:17] = module.model.image_token_id  # 16 image placeholders per sample
    labels = torch.full_like(ids, -100)
    labels[:, 22:28] = ids[:, 22:28]
    mask = torch.ones_like(ids)
    mask[2, 28:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.tensor([0, 0, 0]),
            "pixel_values": torch.randn(3, 3, 32, 32, generator=g)}


def test_the_loss_at_supervised_positions_equals_the_full_logits_loss():
    from mllm_cl.data.collate import supervised_positions

    module = ContinualMLLM(Individual(ExpertSetup(["q_proj", "v_proj"], rank=4)))
    module.method.on_task_start(module.model, 0)
    for p in module.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    batch = _micro_batch(module)
    ours, _ = module.forward_batch(batch, training=True)  # positions found on the device
    hosted, _ = module.forward_batch({**batch, "loss_positions": supervised_positions(batch["labels"])}, training=True)
    with routing_context(module.model, task_ids=batch["task_ids"]):
        full = module.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=0)
    assert torch.equal(ours, hosted)


def test_supervised_positions_are_the_shifted_labels():
    from mllm_cl.data.collate import supervised_positions

    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    # row 0: positions 1 and 2 predict 5 and 6; row 1: position 0 predicts 7 (flat index 4)
    assert supervised_positions(labels).tolist() == [1, 2, 4]


@pytest.mark.parametrize("precision, dtype", [(None, torch.float32), ("32-true", torch.float32),
                                              ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16),
                                              ("bf16-true", torch.bfloat16)])
def test_auto_base_dtype_follows_the_precision(precision, dtype):
    module = ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), precision=precision)
    base = [p for n, p in module.named_parameters() if ".experts." not in n]
    assert all(p.dtype == dtype for p in base)
    assert module.backbone_info["dtype"] == str(dtype).removeprefix("torch.")


def test_a_base_dtype_other_than_autocasts_is_refused_by_name():
    with pytest.raises(ValueError, match="model.backbone_dtype: float32 under trainer.precision bf16-mixed keeps"):
        ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), backbone_dtype="float32", precision="bf16-mixed")
    # without autocast any base dtype is the user's choice
    module = ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), backbone_dtype="bfloat16", precision="32-true")
    assert module.model.language_model.lm_head.weight.dtype == torch.bfloat16


def test_attention_kernel_is_passed_to_transformers_and_checked():
    module = ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), attn_implementation="eager")
    assert module.model.language_model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="model.attn_implementation: unknown kernel 'flash'"):
        ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), attn_implementation="flash")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash_attention_2 needs the flash_attn package"):
            ContinualMLLM(Individual(ExpertSetup(["q_proj"], rank=4)), attn_implementation="flash_attention_2")


def test_observers_run_once_per_step_under_checkpointing():
    """A method's statistics come from the training forward, never from a checkpoint's recomputation."""
    from mllm_cl.experts import expert_layers

    module = ContinualMLLM(Individual(ExpertSetup(["q_proj", "v_proj"], rank=4)), gradient_checkpointing=True)
    module.method.on_task_start(module.model, 0)
    module.train()
    calls = []
    for name, layer in expert_layers(module.model).items():
        layer.register_observer("count", lambda x, routing, context, name=name: calls.append(name))
    loss, _ = module.forward_batch(_micro_batch(module), training=True)
    assert len(calls) == 4  # 2 layers x (q_proj, v_proj)
    loss.backward()  # recomputes every layer (with the routing context of the forward: TaskRouter needs task_ids)
    assert len(calls) == 4


@pytest.mark.parametrize("covariance", ["local", "running"])
def test_same_refreshes_its_statistics_as_often_with_checkpointing_as_without(covariance):
    from mllm_cl.experts import expert_layers
    from mllm_cl.methods import SAME

    counts, snapshots = [], []
    for checkpointing in (False, True):
        method = SAME(ExpertSetup(["up_proj", "down_proj"], rank=4), num_experts=3, refresh_every=2, prior="none",
                      covariance=covariance, max_directions=8)
        module = ContinualMLLM(method, gradient_checkpointing=checkpointing)
        method.on_task_start(module.model, 0)
        module.train()
        for step in range(5):  # refreshes at steps 0, 2 and 4
            loss, _ = module.forward_batch(_micro_batch(module, seed=step), training=True)
            loss.backward()
            method.observe(module.model)
            module.model.zero_grad()
        layers = list(expert_layers(module.model).values())
        counts.append([layer.same.refreshes for layer in layers])
        method.on_task_end(module.model, 0)
        snapshots.append(torch.cat([layer.same.snapshot_sigma for layer in layers]))
    assert counts[0] == counts[1] == [3] * 4  # 2 layers x (up_proj, down_proj), once per refresh step
    torch.testing.assert_close(snapshots[0], snapshots[1])


def test_the_load_device_follows_the_trainers_accelerator(monkeypatch):
    from mllm_cl.system.module import load_device_for

    assert load_device_for("cpu", None) is None and load_device_for("auto", None) is None  # no CUDA here
    assert load_device_for("cuda:1", "cpu") == torch.device("cuda", 1)  # named: taken as it is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")  # a ddp process's GPU
    assert load_device_for("auto", "gpu") == torch.device("cuda", 3) == load_device_for("auto", "auto")
    assert load_device_for("auto", "cpu") is None
    with pytest.raises(ValueError, match="model.load_device: 'gpu0'"):
        load_device_for("gpu0", None)


def test_a_preset_is_made_on_the_load_device():
    from mllm_cl.backbones import build_backbone

    built = build_backbone("tiny-clip-llama", device="meta", overrides={"llm_layers": 2})
    assert {p.device.type for p in built.model.parameters()} == {"meta"}
