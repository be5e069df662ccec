"""A continual-learning method: where experts go, how they are routed, what trains when.

A method is one object in the model's config (``model.method``), selected by
``class_path`` in ``configs/methods/NAME.yaml``. The continual loop asks it for
the phases of each task and calls its hooks between phases, before any
Trainer is built, so structural changes (new experts, frozen experts) never
happen inside a ``fit``:

    build(model)                  once: inject expert layers (no experts yet)
    for task t:
        on_task_start(model, t)   add / freeze experts
        for phase in phases(t):
            on_phase_start(model, t, phase)   set the trainable set
            ... one Trainer.fit over the phase's data and steps ...
            on_phase_end(model, t, phase)
        on_task_end(model, t)

To resume, the loop replays ``on_task_start`` / ``on_task_end`` for finished
tasks to rebuild the structure, then loads the saved adapter weights; so
these hooks must be deterministic given the task index and the method's own
saved state (``state`` / ``load_state``: what a data-dependent decision, such
as which layers grew, needs to be replayed; saved with every checkpoint).

A method may bring its own continual callbacks (``callbacks``: statistics
collected during training, work at task end that needs the task's data) and
report per-stage numbers of its own (``stage_metrics``, written to
``results.json`` under ``method_metrics``).

**The oracle** (``route_by: task_id`` on the routed methods: ``cmoe``, ``routing``, ``same``,
``cram``): the same trained experts, but each evaluated sample routed by its true task id
instead of the method's learned routing, so that a table can show the gap to it (MFN minus the
oracle's MFN). It leaks task identity: a bound on what the method's routing could reach with
its experts, not a method. ``add_oracle_route`` and ``oracle_context`` are the shared parts that
``routing`` and ``cram`` use (a parameter-free ``TaskRouter`` named ``task_id`` in every expert
layer, and the context that sends every sample through it); ``same`` puts the true task in place
of its task prior, ``cmoe`` picks the true task's router instead of the located one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Container

import torch
from torch import nn

from mllm_cl.experts import ExpertLayer, ExpertSetup, InjectionReport, RoutingContext, TaskRouter, expert_layers

#: The oracle's router (``route_by: task_id``) in every expert layer: a ``TaskRouter``, no parameters.
ORACLE_ROUTER = "task_id"


@dataclass
class Phase:
    """One ``fit`` inside a task.

    Args:
        name: shown in logs and timings (``train``, ``expert``, ``gate``, ...).
        steps: optimizer steps; ``None``: the budget of the tasks it trains on (the experiment's
            ``steps_per_task`` or ``epochs_per_task``; joint training gets the sum of its tasks').
        fraction: share of the task's training data (probe phases use < 1).
        tasks: train on these task indices (``None``: the current task only).
        share: instead of ``steps``, this share of the task's budget, at least one step (CRAM's
            warm-up is the first 5% of a task's steps); consecutive share phases run one
            learning-rate schedule over the task.
        lr: the phase's learning rate (``None``: the model's ``lr``).
        warmup: the phase's linear learning-rate warm-up, as a share of its steps (``None``: the
            model's ``warmup_steps`` / ``warmup_ratio``).
        schedule: ``constant`` or ``cosine`` after the warm-up (``None``: the model's ``schedule``).
        samples_per_step: samples per optimizer step over all processes; the accumulation follows
            from the per-process batch and the process count (``None``: the model's ``samples_per_step``).
    """

    name: str = "train"
    steps: int | None = None
    fraction: float = 1.0
    tasks: list[int] | None = None
    share: float | None = None
    lr: float | None = None
    warmup: float | None = None
    schedule: str | None = None
    samples_per_step: int | None = None


class Method:
    """Base class: subclasses override the hooks they need.

    Args:
        experts: where expert layers go and their defaults (targets, rank, router).
    """

    name: str = "method"
    #: only the final row of the accuracy matrix is evaluated (multitask, zero_shot)
    one_row: bool = False
    #: the backbone's tokenizer, set by the system before ``build`` (routing encoders tokenize instructions)
    tokenizer: Any = None
    #: the kind under which ``state()``'s tensors count in the stored parameters (``results.json``)
    state_kind: str = "method_state"
    #: evaluation routes each task's samples by its true task alone, to one expert or a fixed mixture
    #: in every layer (no locator, gate or top-k): ``mllm-cl export`` writes one exact adapter per task
    fixed_routing: bool = False
    #: a training step can leave a trainable parameter out of its backward (an expert kept out of the
    #: forward): DDP must look for unused parameters after every backward
    unused_parameters: bool = False
    #: why a run of this method cannot resume from a checkpoint taken within a task (None: it can)
    in_task_refusal: str | None = None

    def __init__(self, experts: ExpertSetup | None = None) -> None:
        self.experts = experts

    # --------------------------------------------------------------- structure
    def build(self, model: nn.Module) -> InjectionReport | None:
        """Inject the expert layers, before the first task."""
        return None if self.experts is None else self.experts.apply(model)

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        return [Phase()]

    def on_task_start(self, model: nn.Module, task: int) -> None:
        """Structural changes for task ``task`` (0-based): add and freeze experts."""

    def on_phase_start(self, model: nn.Module, task: int, phase: Phase) -> None:
        """Set the trainable set of the phase (default: what the experts' own flags say)."""

    def on_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        pass

    def plan_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        """What ``on_phase_end`` does to the structure, on a model without data (``mllm-cl plan``, the
        ``meta`` device), where what the method decides from data is already set to its largest
        (``mllm_cl.system.memory.largest_structure``). Default: nothing."""

    def plan_task_end(self, model: nn.Module, task: int) -> None:
        """What ``on_task_end`` does to the structure, on a model without data (``mllm-cl plan``).
        Default: ``on_task_end`` itself."""
        self.on_task_end(model, task)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        pass

    # ------------------------------------------------------------------- steps
    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        """Per-sample routing signals for a batch (default: none)."""
        return None

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        """Added to the LM loss (load balancing, orthogonality penalties, ...)."""
        return None

    # ------------------------------------------------------ callbacks and state
    def callbacks(self) -> list:
        """Continual callbacks the method needs; the loop adds them to the configured ones."""
        return []

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What resuming needs besides the expert layers: (JSON-able facts, tensors)."""
        return {}, {}

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state()``'s output before the loop replays the finished tasks."""

    def task_progress(self) -> dict[str, torch.Tensor]:
        """What the current task's training has summed so far outside the model's tensors (this
        process's share of statistics added up over its batches), for a checkpoint taken within the
        task. The checkpoint holds the sum over processes; ``load_task_progress`` gives it back to one
        process and zeros to the others, so a later sum over processes is what it would have been."""
        return {}

    def load_task_progress(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``task_progress()`` after ``on_task_start`` when a run resumes within a task."""

    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        """Numbers of the method's own gathered during the last evaluation (then reset)."""
        return None

    def task_experts(self, task: int, names: list[str]) -> list[str]:
        """The experts among ``names`` that task ``task`` trained (its own experts, for the routing
        diagnostic): by default those named ``task{t}``, ``t{t}`` or ``t{t}e{j}``."""
        own = {f"task{task}", f"t{task}"}
        return [n for n in names if n in own or (n.startswith(f"t{task}e") and n[len(f"t{task}e"):].isdigit())]

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def add_expert_everywhere(model: nn.Module, name: str, **kwargs) -> None:
        for layer in expert_layers(model).values():
            layer.add_expert(name, **kwargs)

    @staticmethod
    def freeze_all_experts(model: nn.Module) -> None:
        for layer in expert_layers(model).values():
            for name in layer.expert_names:
                layer.freeze_expert(name)


# -------------------------------------------------------------------- the oracle
def add_oracle_route(layer: ExpertLayer, task: int, expert: str) -> None:
    """Under the oracle, task ``task``'s samples go to ``expert`` alone with weight 1 in ``layer``.

    The route is kept by the layer's ``TaskRouter`` named ``task_id`` (``ORACLE_ROUTER``), made on
    first use. It has no parameters and no training forward names it, so the trained tensors stay
    those of the method without the oracle; only the recorded structure (``structure.json``) shows
    the extra router.
    """
    if ORACLE_ROUTER not in layer.routers:
        layer.add_router(ORACLE_ROUTER, TaskRouter(layer.in_features))
    router = layer.routers[ORACLE_ROUTER]
    router.task_experts[task] = expert  # first: an expert mapped already takes no other task id when added
    if expert not in router.expert_names:
        router.add_expert(expert)


def oracle_context(task_ids: torch.Tensor, trained: Container[int]) -> RoutingContext:
    """Every sample through the oracle's router (``add_oracle_route``) by its true task id.

    A sample whose task has trained no expert (a general task, id -1; a task after the stage,
    evaluated for forward transfer) routes to no expert: the base model alone."""
    ids = [t if t in trained else -1 for t in task_ids.tolist()]
    return RoutingContext(task_ids=torch.tensor(ids, dtype=torch.long, device=task_ids.device),
                          router_choice=[ORACLE_ROUTER] * len(ids))
