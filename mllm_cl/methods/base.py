"""A continual-learning method: where experts go, how they are routed, what trains when.

A method is one object in the model's config (``model.method``), selected by ``class_path`` in
``configs/methods/NAME.yaml``; ``Method`` below says which hooks it overrides and when the
continual loop calls each. ``Phase`` is one ``fit`` within a task.

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

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm_cl.distributed import all_reduce_sum
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
    """The base of every continual-learning method: override the hooks below to write your own.

    A method decides where the expert layers go, which experts exist for each task and which of
    them train, how each sample is routed, and what it must remember to be rebuilt. It trains
    nothing itself: the continual loop (``mllm_cl.system.loop``) calls its hooks between the fits
    of its phases, before each phase's Trainer and optimizer are built, so the structure never
    changes inside a ``fit``. The loop's calls, in order::

        build(model)                              once, when the model is built
        for task t in 0 .. T-1:
            on_task_start(model, t)
            for phase in phases(t, T):
                on_phase_start(model, t, phase)
                ... one Trainer.fit; every step: routing_context(batch, training=True),
                    the forward, extra_loss(model, batch) ...
                on_phase_end(model, t, phase)
            on_task_end(model, t)
            ... the stage's evaluation: routing_context(batch, training=False) per test batch,
                then stage_metrics(task_names) ...
            state()                               saved with task t's checkpoint

    **Resuming.** A rerun of an interrupted ``mllm-cl fit`` (and ``mllm-cl evaluate``, ``predict``,
    ``export``, the report's routing diagnostic, which rebuild a run at a stage) builds a fresh model
    and method, calls ``load_state`` with the saved state of the last finished task, replays
    ``on_task_start(model, t)`` then ``on_task_end(model, t)`` for every finished task, with no phase
    and no data in between, and loads the saved expert and router weights; a rebuilt structure that
    differs from the saved one is refused. So what the hooks build must follow from the task index
    and the method's state alone: what a method decides from data (which layers grow, the rank of a
    new expert, a task's group) is kept in ``state`` and redone from there by ``on_task_start``. A run
    resumed within a task also gets ``load_state`` (as of the in-task checkpoint) before that task's
    ``on_task_start``, then ``load_task_progress``, and skips the phases that had ended.
    ``tests/methods/test_contract.py`` runs every method through these rules.

    The hooks (each does nothing unless said otherwise):

    - ``build(model)``: once, when the model is built (before the first task, and before a resume's
      replay); ``tokenizer`` is set before it. Injects the expert layers (default: ``experts.apply``,
      the ``ExpertSetup``'s targets, rank and router) and adds what every layer keeps for the whole
      run: observers, gradient transforms, statistics modules.
    - ``phases(task, num_tasks)``: after ``on_task_start``, the phases of task ``task`` in order, a
      fit each (``Phase``: a name, steps or a share of the task's budget, which data, learning
      rate). Default: one phase over the task's data with the task's budget. ``[]``: nothing
      trains in that task (it is still evaluated). ``mllm-cl plan`` calls it too, without data.
    - ``on_task_start(model, task)``: before the task's first phase (and before the continual
      callbacks' ``on_task_start``), and at every replay. Adds, removes, copies and freezes experts
      and routers for the task.
    - ``on_phase_start(model, task, phase)``: before the phase's Trainer and optimizer are built.
      Sets what trains: the optimizer gets every parameter whose ``requires_grad`` is set now, and
      these must be expert or router parameters (the base model stays frozen). Default: the flags
      as they are (experts and routers are trainable when added, until frozen). Also picks the
      layers' active router and adds phase-only experts (a probe).
    - ``on_phase_end(model, task, phase)``: after the phase's ``fit``, with the seed set from the
      task and the phase (so random initialisations here are reproducible). Decides from what the
      phase saw (statistics the method's callbacks collected) and may change the structure. Not
      replayed: record the decision in ``state``.
    - ``on_task_end(model, task)``: after the task's last phase, before the continual callbacks'
      ``on_task_end``, the stage's evaluation and the checkpoint; also at every replay, where no data
      was seen and the state must stay as loaded. Freezes, removes training-only experts, sets
      routers to their evaluation mode.
    - ``routing_context(batch, *, training)``: before the forward of every training micro-batch
      (``training=True``) and of every evaluation batch (its prompt and every generated token).
      Returns the ``RoutingContext`` the routers read (true task ids, a router per sample,
      features), or ``None``.
    - ``extra_loss(model, batch)``: after every training forward; added to the language-model loss
      (load balancing, a penalty). ``None``: no extra loss.
    - ``callbacks()``: once, when ``mllm-cl fit`` sets up its callbacks: the continual callbacks
      (``mllm_cl.callbacks.ContinualCallback``) the method needs, which get Lightning's hooks in every
      phase's Trainer (statistics over training batches) and the loop's task and phase hooks (work
      at task end that needs the task's data).
    - ``state()`` / ``load_state(facts, tensors)``: ``state`` after every task's evaluation, saved with
      its checkpoint (the facts as JSON in ``structure.json``, the tensors in ``method.safetensors``;
      also with every in-task checkpoint); ``load_state`` on a fresh, built method, before a replay.
      ``load_state`` then ``state`` gives back what was saved.
    - ``task_progress()`` / ``load_task_progress(tensors)``: what a checkpoint within a task needs
      besides ``state`` (sums over the task's batches so far).
    - ``stage_metrics(task_names)``: after every evaluation (the zero-shot one at stage 0 included):
      the method's own numbers gathered during it (``results.json``'s ``method_metrics``).
    - ``plan_phase_end(model, task, phase)`` / ``plan_task_end(model, task)``: in ``mllm-cl plan``,
      instead of ``on_phase_end`` / ``on_task_end``, on a model without data (the ``meta`` device).
    - ``task_experts(task, names)``: the experts task ``task`` trained (the routing diagnostic,
      ``mllm-cl export``).

    The class attributes below say how the run treats the method (``name``: its name in
    ``results.json`` and the default run directory).

    Example::

        from mllm_cl.experts import ExpertSetup, RoutingContext, TaskRouter, expert_layers
        from mllm_cl.methods import Method

        class WarmStart(Method):
            '''A LoRA expert per task, started as a copy of the previous task's; each sample
            routed to its own task's expert.'''

            name = "warm_start"

            def __init__(self, experts: ExpertSetup) -> None:
                experts.router = TaskRouter  # task i -> the i-th expert added
                super().__init__(experts)

            def on_task_start(self, model, task):
                self.freeze_all_experts(model)  # earlier tasks' experts stay as they were
                source = f"task{task - 1}" if task else None
                for layer in expert_layers(model).values():
                    layer.add_expert(f"task{task}", init_from=source)  # trainable until frozen

            def routing_context(self, batch, *, training):
                return RoutingContext(task_ids=batch["task_ids"])

    Its structure follows from the task index alone, so it keeps no ``state``. A YAML selects it
    by ``class_path`` under ``model.method``, as ``configs/methods/*.yaml`` do; ``examples/custom_method``
    runs it with ``mllm-cl fit``.

    Args:
        experts: where the expert layers go and their defaults (targets, rank, router); ``None``: no
            expert layers (``zero_shot``).
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
        """Inject the expert layers, once, when the model is built (before the first task or a replay)."""
        return None if self.experts is None else self.experts.apply(model)

    def phases(self, task: int, num_tasks: int) -> list[Phase]:
        """The phases (one fit each) of task ``task`` (0-based) of ``num_tasks``, in order; ``[]``: none."""
        return [Phase()]

    def on_task_start(self, model: nn.Module, task: int) -> None:
        """Structural changes for task ``task`` (0-based): add and freeze experts. Also replayed, without
        data, for every finished task when a run is rebuilt."""

    def on_phase_start(self, model: nn.Module, task: int, phase: Phase) -> None:
        """Set the trainable set of the phase, expert and router parameters only, before its optimizer
        is built (default: what the experts' own flags say)."""

    def on_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        """After the phase's ``fit``: decisions from what it saw. Not replayed: keep them in ``state``."""

    def plan_phase_end(self, model: nn.Module, task: int, phase: Phase) -> None:
        """What ``on_phase_end`` does to the structure, on a model without data (``mllm-cl plan``, the
        ``meta`` device), where what the method decides from data is already set to its largest
        (``mllm_cl.system.memory.largest_structure``). Default: nothing."""

    def plan_task_end(self, model: nn.Module, task: int) -> None:
        """What ``on_task_end`` does to the structure, on a model without data (``mllm-cl plan``).
        Default: ``on_task_end`` itself."""
        self.on_task_end(model, task)

    def on_task_end(self, model: nn.Module, task: int) -> None:
        """After the task's last phase, before its evaluation. Also replayed, without data, for every
        finished task when a run is rebuilt: then it leaves the loaded state as it is."""

    # ------------------------------------------------------------------- steps
    def routing_context(self, batch: dict[str, Any], *, training: bool) -> RoutingContext | None:
        """Per-sample routing signals for a batch, before its forward: every training micro-batch, every
        evaluation batch (default: none)."""
        return None

    def extra_loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | None:
        """Added to the LM loss after every training forward (load balancing, orthogonality penalties, ...)."""
        return None

    # ------------------------------------------------------ callbacks and state
    def callbacks(self) -> list:
        """Continual callbacks the method needs; ``mllm-cl fit`` adds them to the configured ones, once."""
        return []

    def state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """What resuming needs besides the expert layers: (JSON-able facts, tensors); saved with every
        checkpoint."""
        return {}, {}

    def load_state(self, facts: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``state()``'s output on a fresh method, before the finished tasks' hooks are replayed."""

    def task_progress(self) -> dict[str, torch.Tensor]:
        """What the current task's training has summed so far outside the model's tensors (this
        process's share of statistics added up over its batches), for a checkpoint taken within the
        task. The checkpoint holds the sum over processes; ``load_task_progress`` gives it back to one
        process and zeros to the others, so a later sum over processes is what it would have been."""
        return {}

    def load_task_progress(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``task_progress()`` after ``on_task_start`` when a run resumes within a task."""

    def stage_metrics(self, task_names: list[str]) -> dict[str, Any] | None:
        """Numbers of the method's own gathered during the last evaluation (then reset); after every
        evaluation, into ``results.json``'s ``method_metrics``."""
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
    context = RoutingContext(task_ids=torch.tensor(ids, dtype=torch.long, device=task_ids.device),
                             router_choice=[ORACLE_ROUTER] * len(ids))
    context.host_lists["task_ids"] = ids  # the routers read the ids from here: no second read-back
    return context


# ---------------------------------------------------------------- choice accuracy
def choice_metrics(hits: dict[tuple[int, int], int], task_names: list[str], key: str, *,
                   samples: bool = False) -> dict[str, Any]:
    """What a method that chooses a task per sample reports after an evaluation: per true task, the share
    of its samples given their own task (``KEY_accuracy``, %), the confusion (``KEY_confusion``: true task
    -> chosen task -> samples) and, with ``samples``, the samples counted (``KEY_samples``). ``hits``:
    (true task, chosen task) -> this process's samples; summed over processes here (every process scored
    its share of the test sets). A chosen task -1 is "no task" (the base model: ``none`` in the confusion);
    samples of true task -1 (a general task) give ``KEY_general_to_base``, the share of them that chose it.
    Empty when no sample was scored."""
    T = len(task_names)
    confusion = torch.zeros(T + 1, T + 1, dtype=torch.float64)  # [true task, chosen task]; -1 (last): none
    for (true, chosen), n in hits.items():
        confusion[true, chosen] += n
    confusion = all_reduce_sum(confusion)
    total = confusion.sum(1)
    seen = [t for t in range(T) if total[t]]
    names = [*task_names, "none"]
    out: dict[str, Any] = {}
    if seen:
        out[f"{key}_accuracy"] = {task_names[t]: round(100.0 * float(confusion[t, t] / total[t]), 2) for t in seen}
        if samples:
            out[f"{key}_samples"] = {task_names[t]: int(total[t]) for t in seen}
        out[f"{key}_confusion"] = {task_names[t]: {names[c]: int(confusion[t, c]) for c in range(T + 1)
                                                   if confusion[t, c]} for t in seen}
    if total[T]:
        out[f"{key}_general_to_base"] = round(100.0 * float(confusion[T, T] / total[T]), 2)
    return out
