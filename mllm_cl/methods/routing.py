"""Routing-based continual learning (methods.md, section 1; Mohta, Ak et al., arXiv 2511.01831).

Per task t, in every adapted linear:

1. ``expert`` phase: a new LoRA expert ``task{t}`` (rank ``experts.rank``), older
   experts and gates frozen; trained alone, ``y = W0 x + s B_t A_t x``.
2. ``gate`` phase (``gate_steps``, default 100): the expert frozen, its gate vector
   ``v_t`` (zeros) trained alone, ``y = W0 x + sigmoid(v_t . x) s B_t A_t x``.
3. At evaluation every token is routed over the whole pool by standardized
   gate scores, top-k_eff, softmax over the kept (``PostHocGateRouter``).

Options **[choice]** (the paper's defaults where it states them): ``top_k`` 2,
``gate_steps`` 100 (0 skips the gate phase: every gate stays zero and routing is
uniform over the kept), ``null_expert`` off with ``null_score`` 0. No
load-balancing loss. The gate phase takes its own steps on top of the
experiment's ``steps_per_task``.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from mllm_cl.experts import ExpertSetup, PostHocGateRouter, expert_layers
from mllm_cl.methods.base import Method, Phase


class RoutingCL(Method):
    name = "routing"

    def __init__(self, experts: ExpertSetup, *, top_k: int = 2, gate_steps: int = 100, null_expert: bool = False,
                 null_score: float = 0.0) -> None:
        if experts.router is not None:
            raise ValueError("routing builds its own post-hoc gate router: leave experts.router unset")
        if gate_steps < 0:
            raise ValueError(f"routing: gate_steps must be >= 0, got {gate_steps}")
        experts.router = partial(PostHocGateRouter, top_k=top_k, null_expert=null_expert, null_score=null_score)
        super().__init__(experts)
        self.top_k, self.gate_steps = top_k, gate_steps

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        return [Phase("expert")] + ([Phase("gate", steps=self.gate_steps)] if self.gate_steps else [])

    def on_task_start(self, model: nn.Module, task: int) -> None:
        self.freeze_all_experts(model)  # experts and their gates
        self.add_expert_everywhere(model, f"task{task}")

    def on_phase_start(self, model: nn.Module, task: int, phase: Phase) -> None:
        name, gate = f"task{task}", phase.name == "gate"
        for layer in expert_layers(model).values():
            router = layer.routers["default"]
            layer.experts[name].requires_grad_(not gate)
            router.gates[name].requires_grad_(gate)
            router.train_on(name, gate=gate)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        self.freeze_all_experts(model)
        for layer in expert_layers(model).values():
            layer.routers["default"].route()
