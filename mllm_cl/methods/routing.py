"""Routing-based continual learning: one LoRA expert per task, routed per token by post-hoc gates.

Per task, phase ``expert`` trains a new expert ``task{t}`` alone, then phase ``gate`` trains its gate
vector alone in front of the frozen expert (PHATGOOSE's recipe); at evaluation every token is routed
over all experts by standardized gate scores, top-k, softmax over the kept (``PostHocGateRouter``).
Hooks: ``on_task_start`` (freeze everything, add the expert), ``on_phase_start`` (the expert or its
gate trainable), ``on_task_end`` (freeze, switch the routers to routing), ``routing_context`` (the
oracle, ``route_by: task_id``: each sample to its own task's expert).

``route: mean_activation`` (an extension, not the paper's method): no gate phase; at each task's end
its mean standardized input per expert layer is stored (``mllm_cl.methods.mean_activation``) and each
evaluated sample goes, for its whole answer, to the expert of the task its prompt matches best.
``gate_negatives: general`` (an extension): the gate phase also trains on the first general task's
samples (``data.general``), where a loss closes the gate (``PostHocGateRouter``'s negatives).

Mohta, Ak et al., arXiv 2511.01831. See docs/methods/routing.md.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from mllm_cl.callbacks.routing import MeanActivationFitter
from mllm_cl.experts import ExpertSetup, PostHocGateRouter, RoutingContext, expert_layers
from mllm_cl.methods.base import Method, Phase, add_oracle_route, choice_metrics, oracle_context
from mllm_cl.methods.mean_activation import MeanActivations, pooled_inputs, task_means

ROUTES = ("gates", "mean_activation")
NEGATIVES = ("none", "general")


class RoutingCL(Method):
    """Routing-based CL: per-task LoRA experts under PHATGOOSE's post-hoc gates (docs/methods/routing.md)."""

    name = "routing"

    def __init__(self, experts: ExpertSetup, *, top_k: int = 2, gate_steps: int = 100, gate_lr: float | None = 5e-3,
                 gate_warmup: float | None = 0.06, gate_batch: int | None = 1024, expert_scale: float = 1.0,
                 null_expert: bool = False, null_score: float = 0.0, route_by: str = "gates", route: str = "gates",
                 mean_samples: int | None = 1024, gate_negatives: str = "none", negative_weight: float = 1.0) -> None:
        """The method's options.

        Args:
            experts: targets and rank of the per-task experts (the router is built here).
            top_k: experts kept per token at evaluation.
            gate_steps: optimizer steps of the gate phase (0: no gate phase).
            gate_lr: the gate phase's learning rate (``null``: the model's ``lr``).
            gate_warmup: the gate phase's linear warm-up as a share of its steps (``null``: the model's).
            gate_batch: samples per gate step over all processes (PHATGOOSE: 1024); the accumulation
                follows from the per-process batch and process count (``null``: the model's samples per step).
            expert_scale: multiplies each expert's LoRA scale (alpha / r, 2 by default; PHATGOOSE's scale
                1/16 is ``expert_scale: 0.03125``).
            null_expert: one more choice at evaluation that routes to no adapter (with ``route: mean_activation``:
                chosen by the first general task's mean, ``data.general``, taken at the first task's end).
            null_score: the null expert's constant score.
            route_by: ``gates`` (the method's routing, as ``route`` says) or ``task_id`` (the oracle: each
                sample to its task's expert).
            route: ``gates`` (the paper: per-token top-k over the trained gates) or ``mean_activation`` (an
                extension: no gates; per sample, the task whose stored mean layer inputs its prompt matches,
                that task's expert for the whole answer; needs ``gate_steps: 0``).
            mean_samples: with ``route: mean_activation``, the training samples per task its means are taken
                over (the first ones; ``null``: all).
            gate_negatives: ``none`` (the paper: a gate sees only its own task) or ``general`` (an extension:
                the gate phase also draws the first general task's training samples, ``data.general``, where
                ``negative_weight`` times ``-log(1 - gate)`` per token closes the gate; the language-model
                loss there moves no gate).
            negative_weight: the weight of that loss, per gate.
        """
        if experts.router is not None:
            raise ValueError("routing builds its own post-hoc gate router: leave experts.router unset")
        if gate_steps < 0 or (gate_batch is not None and gate_batch < 1) or expert_scale <= 0:
            raise ValueError(f"routing: need gate_steps >= 0, gate_batch >= 1 (or null) and expert_scale > 0, got "
                             f"{gate_steps}, {gate_batch} and {expert_scale}")
        if gate_warmup is not None and not 0 <= gate_warmup < 1:
            raise ValueError(f"routing: gate_warmup is a share of the gate steps in [0, 1), got {gate_warmup}")
        if route_by not in ("gates", "task_id"):
            raise ValueError(f"routing: route_by must be 'gates' or 'task_id', got {route_by!r}")
        if route not in ROUTES:
            raise ValueError(f"routing: route must be one of {', '.join(ROUTES)}, got {route!r}")
        if route == "mean_activation" and gate_steps:
            raise ValueError(f"routing: route mean_activation trains no gates; set gate_steps: 0 (got {gate_steps})")
        if gate_negatives not in NEGATIVES:
            raise ValueError(f"routing: gate_negatives must be one of {', '.join(NEGATIVES)}, got {gate_negatives!r}")
        if gate_negatives != "none" and (route != "gates" or not gate_steps):
            raise ValueError("routing: gate_negatives trains the gates: it needs route: gates and gate_steps > 0")
        if negative_weight < 0:
            raise ValueError(f"routing: negative_weight must be >= 0, got {negative_weight}")
        if mean_samples is not None and mean_samples < 1:
            raise ValueError(f"routing: mean_samples must be >= 1 (or null: all), got {mean_samples}")
        experts.router = partial(PostHocGateRouter, top_k=top_k, null_expert=null_expert, null_score=null_score)
        super().__init__(experts)
        self.top_k, self.gate_steps = top_k, gate_steps
        self.gate_lr, self.gate_warmup, self.gate_batch = gate_lr, gate_warmup, gate_batch
        self.expert_scale = expert_scale
        self.route_by, self.route, self.mean_samples = route_by, route, mean_samples
        self.gate_negatives, self.negative_weight = gate_negatives, negative_weight
        self.negatives = False  # the current phase draws negatives (a gate phase with gate_negatives)
        self.tasks = 0  # tasks whose expert exists (the oracle routes only those)
        self.null_expert = null_expert
        self.means = MeanActivations()  # route: mean_activation
        self._hits: dict[tuple[int, int], int] = {}  # (true task, chosen task) -> samples, this evaluation
        self._model: nn.Module | None = None

    def build(self, model: nn.Module):
        self._model = model
        return super().build(model)

    def callbacks(self) -> list:
        return [MeanActivationFitter(self)] if self.route == "mean_activation" else []

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        constant = None if self.gate_lr is None and self.gate_warmup is None else "constant"  # PHATGOOSE's
        union = [task, -1] if self.gate_negatives == "general" else None  # -1: the first general task
        gate = Phase("gate", steps=self.gate_steps, lr=self.gate_lr, warmup=self.gate_warmup, schedule=constant,
                     samples_per_step=self.gate_batch, tasks=union)
        return [Phase("expert")] + ([gate] if self.gate_steps else [])

    def on_task_start(self, model: nn.Module, task: int) -> None:
        self.freeze_all_experts(model)  # experts and their gates
        rank = self.experts.rank
        alpha = (self.experts.alpha if self.experts.alpha is not None else 2.0 * rank) * self.expert_scale
        self.add_expert_everywhere(model, f"task{task}", alpha=alpha)
        self.tasks = task + 1
        if self.route_by == "task_id" or self.route == "mean_activation":  # a route per task id
            for layer in expert_layers(model).values():
                add_oracle_route(layer, task, f"task{task}")

    def on_phase_start(self, model: nn.Module, task: int, phase: Phase) -> None:
        name, gate = f"task{task}", phase.name == "gate"
        self.negatives = gate and self.gate_negatives != "none"
        for layer in expert_layers(model).values():
            router = layer.routers["default"]
            layer.experts[name].requires_grad_(not gate)
            router.gates[name].requires_grad_(gate)
            router.train_on(name, gate=gate)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        self.negatives = False
        self.freeze_all_experts(model)
        for layer in expert_layers(model).values():
            layer.routers["default"].route()

    def fit_mean_activations(self, module, task: int) -> None:
        """Store task ``task``'s mean standardized input per expert layer (``route: mean_activation``).
        ``module``: the ContinualMLLM, its task sequence connected."""
        if self.means.num_tasks != task:
            raise RuntimeError(f"routing: mean activations of {self.means.num_tasks} tasks stored at the end of task "
                               f"{task}; expected one per finished task")
        self.means.add_task(task_means(module, task, self.mean_samples))
        if self.null_expert and not self.means.base:
            if not module.sequence.general_tasks:
                raise ValueError("routing: route mean_activation with null_expert takes the no-expert choice's mean "
                                 "from the first general task; set data.general")
            self.means.set_base(task_means(module, -1, self.mean_samples))

    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        if training:  # the phase's mode of the gate router, told which samples are negatives
            if self.negatives:
                return RoutingContext(token_mask=batch["attention_mask"], extra={"negative": batch["task_ids"] < 0})
            return None
        if self.route_by == "task_id":
            return oracle_context(batch["task_ids"], range(self.tasks))
        if self.route == "gates" or not self.means.num_tasks:
            return None  # the gates
        # each sample to its chosen task's expert (-1: the base)
        context = oracle_context(self.means.choose(pooled_inputs(self._model, batch)), range(self.tasks))
        for true, pred in zip(batch["task_ids"].tolist(), context.host_list("task_ids"), strict=True):
            self._hits[(true, pred)] = self._hits.get((true, pred), 0) + 1
        return context

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        if not self.negatives or not self.negative_weight:
            return None
        losses = [layer.routers["default"].negative_loss for layer in expert_layers(model).values()]
        losses = [loss for loss in losses if loss is not None]
        return self.negative_weight * torch.stack(losses).sum() if losses else None

    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        out = choice_metrics(self._hits, task_names, "mean_activation")
        self._hits = {}
        return out or None

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.route != "mean_activation":
            return {}, {}
        return {"mean_activation_tasks": self.means.num_tasks}, self.means.state()

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        if self.route == "mean_activation":
            self.means.load_state(tensors, facts.get("mean_activation_tasks", 0))
