"""A task's training budget: how many optimizer steps each phase trains, of how many samples each,
under which learning-rate schedule.

The budget is given per task in steps (``steps_per_task``) or in epochs (``epochs_per_task``),
exactly one of them, with overrides by task name (``task_budgets``). An epoch is one pass over the
phase's data by every process: ``ceil(micro-batches per epoch / accumulation)`` optimizer steps.
Samples per optimizer step (``samples_per_step``) fix the accumulation from the per-process batch and
the number of processes, so one config means the same on one GPU and on eight.

A phase's steps: its own ``steps`` when it sets them (a gate or probe phase); else a ``share`` of the
task's budget (the phases that split a task, CRAM's); else the budget of the tasks it trains on (a
joint phase: the sum of theirs), counted over the phase's own data (a ``fraction`` < 1 of a task makes
its epochs shorter). ``max_phase_steps`` caps every phase.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mllm_cl.methods.base import Phase
from mllm_cl.system.schedule import PhaseSchedule, check_schedule


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class TaskBudget:
    """One task's budget: ``steps`` optimizer steps or ``epochs`` passes over its data (exactly one)."""

    steps: int | None = None
    epochs: float | None = None

    @classmethod
    def of(cls, steps: int | None, epochs: float | None, key: str) -> TaskBudget:
        if (steps is None) == (epochs is None):
            raise ValueError(f"{key}: give exactly one of steps and epochs (the other null), got steps={steps}, "
                             f"epochs={epochs}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{key}: steps must be an integer >= 1, got {steps!r}")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
            raise ValueError(f"{key}: epochs must be a number > 0, got {epochs!r}")
        return cls(steps=steps, epochs=None if epochs is None else float(epochs))

    def describe(self) -> str:
        if self.steps is not None:
            return f"{self.steps} steps"
        return f"{self.epochs:g} epoch" + ("" if self.epochs == 1 else "s")


@dataclass(frozen=True)
class PhasePlan:
    """What one phase trains: ``steps`` optimizer steps of ``accumulation`` micro-batches each."""

    steps: int
    accumulation: int
    samples_per_step: int  # per-process batch x processes x accumulation
    schedule: PhaseSchedule
    batches_per_epoch: int  # micro-batches one process draws in one pass over the phase's data
    rule: str  # how the steps were set, for the log: "2 epochs", "100 steps", "5% of the task", ...


class Budget:
    """The run's budget options (``ContinualMLLM``'s; see there for each)."""

    def __init__(self, *, steps_per_task: int | None, epochs_per_task: float | None,
                 task_budgets: dict[str, dict] | None, samples_per_step: int | None, lr: float, schedule: str,
                 min_lr_ratio: float, warmup_steps: int, warmup_ratio: float,
                 max_phase_steps: int | None) -> None:
        self.default = TaskBudget.of(steps_per_task, epochs_per_task, "model.steps_per_task / model.epochs_per_task")
        self.per_task: dict[str, TaskBudget] = {}
        for name, rule in (task_budgets or {}).items():
            if not isinstance(rule, dict) or set(rule) - {"steps", "epochs"}:
                raise ValueError(f"model.task_budgets.{name}: give {{steps: N}} or {{epochs: X}}, got {rule!r}")
            self.per_task[name] = TaskBudget.of(rule.get("steps"), rule.get("epochs"), f"model.task_budgets.{name}")
        if samples_per_step is not None and samples_per_step < 1:
            raise ValueError(f"model.samples_per_step must be >= 1 or null, got {samples_per_step}")
        if warmup_steps < 0 or not 0 <= warmup_ratio < 1 or (warmup_steps and warmup_ratio):
            raise ValueError("model.warmup_steps (>= 0) and model.warmup_ratio (a share of a phase's steps, in "
                             f"[0, 1)): give at most one, got {warmup_steps} and {warmup_ratio}")
        if max_phase_steps is not None and max_phase_steps < 1:
            raise ValueError(f"model.max_phase_steps must be >= 1 or null, got {max_phase_steps}")
        self.samples_per_step, self.lr = samples_per_step, lr
        self.schedule = check_schedule(schedule, "model.schedule")
        self.min_lr_ratio, self.warmup_steps, self.warmup_ratio = min_lr_ratio, warmup_steps, warmup_ratio
        self.max_phase_steps = max_phase_steps
        PhaseSchedule(lr=lr, total=1, schedule=schedule, floor=min_lr_ratio)  # checks the floor

    def check_tasks(self, names: list[str]) -> None:
        unknown = [n for n in self.per_task if n not in names]
        if unknown:
            raise ValueError(f"model.task_budgets names tasks that are not in the sequence: {unknown}; "
                             f"tasks: {names}")

    def task(self, name: str) -> TaskBudget:
        return self.per_task.get(name, self.default)

    def accumulation(self, phase: Phase, batch_size: int, world_size: int, configured: int = 1) -> int:
        """Micro-batches per optimizer step: from the phase's or the run's samples per step, else the
        Trainer's configured ``accumulate_grad_batches``."""
        samples = phase.samples_per_step or self.samples_per_step
        if samples is None:
            return configured
        return max(1, round_half_up(samples / (batch_size * world_size)))

    def plan_task(self, task: int, phases: list[Phase], names: list[str], batches: Callable[[list[int], float], int],
                  *, batch_size: int, world_size: int, configured_accumulation: int = 1) -> list[PhasePlan]:
        """The plans of task ``task``'s ``phases``. ``names``: the task names of the sequence;
        ``batches(tasks, fraction)``: micro-batches one process draws per epoch of that data."""
        plans: list[dict] = []
        for phase in phases:
            acc = self.accumulation(phase, batch_size, world_size, configured_accumulation)
            tasks = phase.tasks or [task]
            mb = batches(tasks, phase.fraction)
            if phase.steps is not None:
                steps, rule = phase.steps, f"{phase.steps} steps (the phase's own)"
            elif phase.share is not None:
                whole = sum(self._steps(names[i], batches([i], 1.0), acc) for i in tasks)
                steps, rule = max(1, round_half_up(phase.share * whole)), f"{phase.share:.0%} of {whole} steps"
            else:
                steps = sum(self._steps(names[i], batches([i], phase.fraction), acc) for i in tasks)
                rules = {self.task(names[i]).describe() for i in tasks}
                rule = (rules.pop() if len(rules) == 1 else "the tasks' budgets") + \
                    (f" of {len(tasks)} tasks" if len(tasks) > 1 else "")
            if self.max_phase_steps is not None and steps > self.max_phase_steps:
                steps, rule = self.max_phase_steps, f"{rule}, capped by model.max_phase_steps"
            plans.append({"phase": phase, "steps": steps, "acc": acc, "mb": mb, "rule": rule})
        return [PhasePlan(steps=p["steps"], accumulation=p["acc"], samples_per_step=batch_size * world_size * p["acc"],
                          schedule=schedule, batches_per_epoch=p["mb"], rule=p["rule"])
                for p, schedule in zip(plans, self._schedules(plans), strict=False)]

    def _steps(self, name: str, micro_batches: int, accumulation: int) -> int:
        rule = self.task(name)
        if rule.steps is not None:
            return rule.steps
        return max(1, round_half_up(rule.epochs * math.ceil(micro_batches / accumulation)))

    def _schedules(self, plans: list[dict]) -> list[PhaseSchedule]:
        """One schedule per phase; consecutive ``share`` phases run one schedule over their sum."""
        out: list[PhaseSchedule] = []
        k = 0
        while k < len(plans):
            span = [plans[k]]
            while plans[k]["phase"].share is not None and k + len(span) < len(plans) \
                    and plans[k + len(span)]["phase"].share is not None:
                span.append(plans[k + len(span)])
            total = sum(p["steps"] for p in span)
            first = span[0]["phase"]
            if first.warmup is not None:
                warmup = round_half_up(first.warmup * total)
            else:
                warmup = self.warmup_steps or round_half_up(self.warmup_ratio * total)
            offset = 0
            for p in span:
                phase = p["phase"]
                out.append(PhaseSchedule(lr=self.lr if phase.lr is None else phase.lr, total=total, warmup=warmup,
                                         schedule=phase.schedule or self.schedule, floor=self.min_lr_ratio,
                                         offset=offset))
                offset += p["steps"]
            k += len(span)
        return out
