"""ContinualMLLM: only trainable parameters reach the optimizer; options are checked."""

import pytest

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
