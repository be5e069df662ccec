"""ContinualMLLM: only trainable parameters reach the optimizer; options are checked."""

import pytest
import torch

from mllm_cl.experts import ExpertSetup
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
