"""A new continual-learning method by subclassing ``Method``: one LoRA expert per task, warm-started.

Task t gets its own expert ``task{t}`` in every adapted layer, initialised as a copy of task t-1's
expert, so it starts from what the sequence has learned so far instead of from zero; the older
experts are frozen, so nothing a task learned is overwritten. Each sample is routed to its own
task's expert by its true task id, as the ``individual`` baseline routes (``warm_start: false`` is
that baseline).

Two hooks do the work: ``on_task_start`` changes the structure (freeze, add, copy) and
``routing_context`` tells the ``TaskRouter`` which task each sample belongs to. Both depend on the
task index alone, so a resumed run replays them as they are and the method needs no ``state``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mllm_cl.experts import ExpertSetup, RoutingContext, TaskRouter, expert_layers
from mllm_cl.methods import Method


class WarmStartLoRA(Method):
    """One LoRA expert per task, initialised from the previous task's, routed by the true task id.

    Args:
        experts: targets and rank of the per-task experts (routed by task id: leave ``router`` unset).
        warm_start: copy the previous task's expert into the new one (``false``: a fresh LoRA per task).
    """

    name = "warm_start"
    fixed_routing = True  # each task's samples use one expert: `mllm-cl export` writes one adapter per task

    def __init__(self, experts: ExpertSetup, *, warm_start: bool = True) -> None:
        if experts.router is not None:
            raise ValueError("warm_start routes by task id: leave experts.router unset")
        experts.router = TaskRouter  # task i -> the i-th expert added
        super().__init__(experts)
        self.warm_start = warm_start

    def on_task_start(self, model: nn.Module, task: int) -> None:
        self.freeze_all_experts(model)  # earlier tasks' experts stay as they were
        source = f"task{task - 1}" if self.warm_start and task > 0 else None
        for layer in expert_layers(model).values():
            layer.add_expert(f"task{task}", init_from=source)  # new, trainable, in every router

    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext:
        return RoutingContext(task_ids=batch["task_ids"])
