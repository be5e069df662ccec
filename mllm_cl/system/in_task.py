"""Checkpoints within a task: every N optimizer steps, what a phase needs to go on after a crash.

``RUN/checkpoints/in_task/`` holds the expert layers' tensors and structure (as a task checkpoint
does), the method's state and the task's progress (``Method.task_progress``), where the run was
(task, phase, optimizer step, micro-batches drawn) and ``trainer.pt``: the optimizer's, the
learning-rate schedule's and the random generators' state. Only the last one is kept; it is removed
once the task's own checkpoint is written.

Resuming (``ContinualLoop``): the finished tasks are rebuilt as always, then the method's state is
loaded, the task's start replayed, the phases that had ended skipped, the interrupted phase started
and the tensors loaded. Its Trainer draws the micro-batches already trained on again, without
training on them (each phase's data order is seeded, so they are the same batches), and after the
last of them restores the optimizer, the schedule and the generators: the steps that follow are
those of the uninterrupted run. Drawing those batches again costs their loading time only.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

from mllm_cl.data.errors import SkipLog
from mllm_cl.distributed import all_reduce_sum, world

#: Test hook: raise right after the in-task checkpoint ``TASK/PHASE/STEP`` (1-based task number) is saved.
FAULT_STEP_ENV = "MLLM_CL_FAULT_AFTER_STEP"
PROGRESS = "progress."  # the prefix of the task's progress among the method's tensors


class InjectedStepFault(RuntimeError):
    pass


@dataclass
class Resume:
    """Where the last in-task checkpoint was taken, and its folder."""

    folder: Path
    task: int  # 0-based
    phase: int  # index in the task's phases
    phase_name: str
    step: int  # optimizer steps of the phase done
    batches: int  # micro-batches of the phase drawn
    loop: dict[str, Any]  # the task's records so far: trainable parameters, phase timings, skipped samples

    @classmethod
    def read(cls, run) -> Resume | None:
        folder = run.in_task()
        if folder is None:
            return None
        where = json.loads((folder / "structure.json").read_text())["in_task"]
        return cls(folder, where["task"], where["phase"], where["phase_name"], where["step"], where["batches"],
                   where["loop"])

    def trainable(self) -> dict[str, torch.Tensor]:
        """The task's trainable parameters before this phase, by name (sizes only, for the counts)."""
        return {name: torch.empty(n, device="meta") for name, n in self.loop["trainable"].items()}

    def timings(self) -> dict[str, float]:
        """Seconds of the task's phases that had ended."""
        return dict(self.loop["timings"])

    def skips(self) -> SkipLog:
        """The task's skipped samples as the phase started (its own batches are drawn again)."""
        return SkipLog(Counter(self.loop["skips"]["counts"]), list(self.loop["skips"]["examples"]))

    def method_state(self, run, device=None) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(facts, tensors, the task's progress) as ``Method.load_state`` and ``load_task_progress``
        take them; the progress is this process's share (all of it on rank 0, zeros elsewhere), on
        ``device`` (where the training adds to it)."""
        facts, tensors = run.method_state(self.folder)
        progress = {k.removeprefix(PROGRESS): v.to(device) for k, v in tensors.items() if k.startswith(PROGRESS)}
        if world()[0] != 0:
            progress = {k: torch.zeros_like(v) for k, v in progress.items()}
        return facts, {k: v for k, v in tensors.items() if not k.startswith(PROGRESS)}, progress


class InTaskCheckpoints(L.Callback):
    """Saves the in-task checkpoint every ``every`` optimizer steps of a phase, and (given
    ``resume``) restores the optimizer, schedule and generators once the phase's Trainer has drawn
    the micro-batches the checkpoint had trained on (``ContinualMLLM.fast_forward``)."""

    def __init__(self, run, every: int, *, task: int, phase: int, phase_name: str, method, backbone_info: dict,
                 progress: dict[str, Any], resume: Resume | None = None) -> None:
        self.run, self.every, self.method, self.backbone_info = run, every, method, backbone_info
        self.where = {"task": task, "phase": phase, "phase_name": phase_name}
        self.progress = progress  # the loop's: trainable parameters, timings, skips at the phase's start
        self.resume = resume
        self.batches, self.saved_at = 0, None

    def on_train_start(self, trainer, pl_module) -> None:
        self.batches = 0
        pl_module.fast_forward = self.resume.batches if self.resume is not None else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.resume is not None:
            if self.batches == self.resume.batches:
                self._restore(trainer)
            return
        step = trainer.global_step
        if self.every and step and step % self.every == 0 and step != self.saved_at:
            self.saved_at = step
            self._save(trainer, pl_module, step)
            fault = f"{self.where['task'] + 1}/{self.where['phase_name']}/{step}"
            if os.environ.get(FAULT_STEP_ENV) == fault:
                raise InjectedStepFault(f"{FAULT_STEP_ENV}={fault}: stopping after this in-task checkpoint as asked")

    def _save(self, trainer, pl_module, step: int) -> None:
        facts, tensors = self.method.state()
        # Every process's share of the task's statistics, summed (a collective: every process runs it).
        progress = {PROGRESS + k: all_reduce_sum(v.detach()) for k, v in self.method.task_progress().items()}
        state = {"optimizers": [o.state_dict() for o in trainer.optimizers],
                 "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
                 "rng": _collect_rng_states()}
        skips = self.progress["skips"]
        loop = {"trainable": {name: p.numel() for name, p in self.progress["trainable"].items()},
                "timings": dict(self.progress["timings"]),
                "skips": {"counts": dict(skips.counts), "examples": list(skips.examples)}}
        extra = {"method": self.method.name, "backbone": self.backbone_info, "method_state": facts,
                 "in_task": {**self.where, "step": step, "batches": self.batches, "loop": loop}}
        self.run.save_in_task(pl_module.model, extra, {**tensors, **progress}, state)

    def _restore(self, trainer) -> None:
        state = torch.load(self.resume.folder / "trainer.pt", map_location="cpu", weights_only=False)
        if trainer.global_step != self.resume.step:
            raise RuntimeError(f"{self.resume.folder}: drawing the {self.resume.batches} micro-batches already "
                               f"trained on reached optimizer step {trainer.global_step}, not {self.resume.step}; "
                               "the phase's step budget or accumulation differs from the checkpoint's")
        for optimizer, saved in zip(trainer.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"], strict=True):
            config.scheduler.load_state_dict(saved)
        _set_rng_states(state["rng"])
        trainer.lightning_module.fast_forward = 0
        self.resume = None
