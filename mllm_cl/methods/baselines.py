"""The baselines every method is judged against (docs/methods/baselines.md).

- ``ZeroShot``: the base model, no training; one row (MFN only).
- ``LoRAFineTune``: one shared LoRA trained on task 1, then 2, ... (shows forgetting).
- ``MoELoRA``: CoIN's MoELoRA: E experts of rank r/E per layer, a dense per-token
  softmax router, everything trainable on every task, no growth.
- ``MultiTask``: one joint run on all tasks with the same total step budget;
  the final row only. ``cumulative=True``: at stage t, train from the base on
  tasks 1..t (fills the whole matrix; cost grows with t).
- ``Individual``: a separate LoRA per task, routed by the true task id.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mllm_cl.experts import ExpertSetup, RoutingContext, SoftmaxRouter, TaskRouter, expert_layers
from mllm_cl.methods.base import Method, Phase


class ZeroShot(Method):
    """The base model, no training: the zero-shot row as a one-row method (MFN only)."""

    name = "zero_shot"
    one_row = True
    fixed_routing = True

    def __init__(self) -> None:
        super().__init__(None)

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        return []


class LoRAFineTune(Method):
    """One expert named ``shared`` in every adapted layer, trained on every task in turn."""

    name = "lora_ft"
    fixed_routing = True

    def __init__(self, experts: ExpertSetup) -> None:
        super().__init__(experts)

    def on_task_start(self, model: nn.Module, task: int) -> None:
        if task == 0:
            self.add_expert_everywhere(model, "shared")


class MoELoRA(Method):
    """CoIN's MoELoRA: ``num_experts`` experts of rank ``experts.rank // num_experts`` under a dense softmax router.

    The router is built here (a ``SoftmaxRouter``), so ``experts.router`` must be unset.

    Args:
        experts: targets and the total rank, split evenly over the experts.
        num_experts: experts per adapted linear (must divide ``experts.rank``).
    """

    name = "moelora"

    def __init__(self, experts: ExpertSetup, *, num_experts: int = 8) -> None:
        if experts.rank % num_experts:
            raise ValueError(f"moelora: rank {experts.rank} is not divisible by num_experts {num_experts}")
        if experts.router is not None:
            raise ValueError("moelora builds its own dense softmax router: leave experts.router unset")
        experts.router = SoftmaxRouter
        super().__init__(experts)
        self.num_experts = num_experts

    def on_task_start(self, model: nn.Module, task: int) -> None:
        if task == 0:
            for i in range(self.num_experts):
                self.add_expert_everywhere(model, f"e{i}", rank=self.experts.rank // self.num_experts)


class MultiTask(Method):
    """Joint training on the union of tasks with the sequence's total step budget.

    Args:
        experts: targets and rank of the one joint adapter.
        cumulative: at every stage t, train a fresh adapter from the base on tasks 1..t (fills the whole
            matrix; the cost grows with t) instead of once on every task (the final row only).
    """

    name = "multitask"
    fixed_routing = True

    def __init__(self, experts: ExpertSetup, *, cumulative: bool = False) -> None:
        super().__init__(experts)
        self.cumulative = cumulative
        self.one_row = not cumulative

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        # Phase.steps None: steps_per_task x the number of tasks trained on.
        if self.cumulative:
            return [Phase("joint", tasks=list(range(task + 1)))]
        if task < num_tasks - 1:
            return []  # nothing to train until every task's data is there
        return [Phase("joint", tasks=list(range(num_tasks)))]

    def on_task_start(self, model: nn.Module, task: int) -> None:
        if task == 0:
            self.add_expert_everywhere(model, "joint")
        elif self.cumulative:  # from the base again: a fresh adapter at every stage
            for layer in expert_layers(model).values():
                layer.remove_expert("joint")
                layer.add_expert("joint")


class Individual(Method):
    """A new expert per task (older ones frozen), routed by the sample's true task id."""

    name = "individual"
    fixed_routing = True

    def __init__(self, experts: ExpertSetup) -> None:
        if experts.router is not None:
            raise ValueError("individual routes by task id: leave experts.router unset")
        experts.router = TaskRouter
        super().__init__(experts)

    def on_task_start(self, model: nn.Module, task: int) -> None:
        self.freeze_all_experts(model)
        self.add_expert_everywhere(model, f"task{task}")

    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext:
        return RoutingContext(task_ids=batch["task_ids"])
